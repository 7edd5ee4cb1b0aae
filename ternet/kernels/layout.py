"""Buffer layout constants shared by kernels, layers and tests (see docs/kernels.md)."""
CH_ALIGN = 16   # channels padded to a multiple of this in activations and prepared weights
ROW_SLACK = 8   # extra rows every 2-D activation buffer has past its P real rows


def pad_to(n: int, m: int = CH_ALIGN) -> int:
    return -(-n // m) * m


def rows_for(p: int) -> int:
    return p + ROW_SLACK
