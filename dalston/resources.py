"""Where the project's data folders (`catalog/`, `nats/`) are, in a checkout or a wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The top-level data folder `name`: the copy a wheel carries, else the checkout's own. Not
    any `name` folder beside the package: installed, that is site-packages, where `nats` is nats-py."""
    wheel, checkout = _PACKAGE / "_data" / name, _PACKAGE.parent / name
    if wheel.is_dir():
        return wheel
    if (_PACKAGE.parent / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"data folder {name!r} is missing from this installation")
