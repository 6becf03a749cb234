"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

import errno


class TloraError(Exception):
    """A problem with the user's inputs or environment: say what was wrong and what to do."""


def printable(text: str) -> str:
    """Text as a message may print it: a name's bytes that are not UTF-8 (os.fsdecode's surrogates) as \\xff,
    as the user would type them; printing the surrogates themselves fails on a UTF-8 stream."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte stands for (JSON's \\ud800)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def name_too_long(error: BaseException) -> bool:
    """ENAMETOOLONG: a path the user named (or one made from it) is longer than the file system allows."""
    return isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG


def disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised by Python as OSError or by safetensors' Rust writer as an error message."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


class Stopped(TloraError):
    """Every rank of a torchrun job stops on this one error; only rank 0 says it (distributed.py)."""


class Lost(Stopped):
    """A collective's partner is gone: killed, crashed, or silent past the timeout."""


def is_connection_error(error: BaseException) -> bool:
    """A network failure, whichever HTTP client huggingface_hub uses (requests, httpx, httpx2): judged by the error's
    class names, as the client is not ours to import."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(
        names & {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutError", "TransportError", "Timeout"}
    )
