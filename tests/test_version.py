"""`tlora --version`."""

from tlora_cli import __version__


def test_version(run_cli):
    result = run_cli("--version")
    assert result.code == 0 and result.stdout == f"tlora {__version__}\n"
