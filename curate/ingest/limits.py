"""The bounds inputs are held to, in one dependency-free module (the CLI shows them in --help)."""

# PIL's own refusal threshold (2 * Image.MAX_IMAGE_PIXELS): it raises DecompressionBombError
# above this at open, whatever we ask, so a larger max_pixels cannot admit more than this.
DEFAULT_MAX_PIXELS = 178_956_970
# A label above this is a data error, not a class: the proxy gets one output per class.
DEFAULT_MAX_CLASSES = 100_000
# One image file; anything larger is not an image this tool should read into memory.
MAX_INPUT_BYTES = 1 << 30
# A model input side (a proxy's --image-size, a ViT's --img-size): below this no recipe's
# augmentation or patch grid works; above it the position table alone would not fit in memory.
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 4096


def class_count_fault(value: object, what: str, max_classes: int = DEFAULT_MAX_CLASSES) -> str:
    """Why `value` cannot size a classifier head, or "": a class count is an integer (not a bool)
    from 2 to `max_classes`. `what` names the value in the message (an option, a manifest field)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= max_classes:
        return f"{what} {value!r:.40} is not a class count from 2 to {max_classes}"
    return ""
