"""The names of sparsevit's choices, in a module that imports nothing heavy: `curate train --help`
lists them without waiting for torch and timm. Each registry is declared with its tuple
(`Registry(kind, names=...)`) and refuses a name it does not list; tests/test_cli.py checks that
every listed name is registered, so the two cannot drift apart."""

KEEP_SCHEDULES = ("constant", "trilevel", "toe")
DROP_BY = ("importance", "random")  # rank tokens by the stored maps | at random (the control)
SELECT_BY = ("maps", "selector", "mix")  # who ranks tokens in training when there are selectors
ATTENTION_MODES = ("dense", "topk", "gather")
EXAMPLE_PRUNERS = ("none", "infobatch", "trilevel", "rs2", "top-score")
LOADERS = ("stream", "memory")  # decode every epoch in loader workers | decode once, augment in batches
DECODE = ("cpu", "gpu")  # who decodes the training JPEGs: loader workers (PIL) | the GPU (nvJPEG)
