"""The one error type users see: a one-line message naming what was wrong and what is expected."""


class StnbenchError(ValueError):
    """Bad input (a name, a shape, a file, a setting). Commands print it on one line and exit 2."""


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (Hydra's and torchvision's span several)."""
    return " ".join(s.strip() for s in str(error).splitlines() if s.strip()) or type(error).__name__
