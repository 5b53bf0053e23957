"""Human-readable quantities."""


def human_bytes(size: int) -> str:
    """``size`` bytes in binary units: ``512 B``, ``1.5 KiB``, … up to GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
