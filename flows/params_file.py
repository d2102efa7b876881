"""params.yaml as a run changes it: parsed once, changed only through its methods.

A run's configuration is params.yaml, and params.yaml is also the run's state: the run's
own parameters and the retrain overrides are written into it (so DVC sees them and reruns
the affected stages), the bake-off leaves it at the winner's family, and at the end it goes
back to what the last promoted attempt ran with (or to the start when none promoted).

`ParamsFile` owns the file for the length of a run. It parses it once into the typed
`Params` (`synthloop.config.load_params`) and hands that value down; each change is a
method that writes the file and leaves the value parsed again, once. Nothing else in the
flow reads the file. The stages (`synthloop stage X` under `dvc repro`) still read it
themselves: that is DVC's contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.loop import apply_overrides
from synthloop.config import Params, load_params
from synthloop.dataset import atomic_file


class ParamsFile:
    """One workspace's params.yaml during a run: its parsed value and the run's changes.

    - `params`: the parsed value, as the file stands after the last change.
    - `apply(overrides)`: write an override set (a retrain step, the run's parameters),
      comments kept; a set that does not validate never lands.
    - `set_family(family)`: `train.family` (a bake-off's candidate, then its winner).
    - `snapshot()` / `restore(text)`: the file's text, and putting a text back.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._params: Params | None = load_params(self.path)

    @property
    def params(self) -> Params:
        """The parsed file. After a `restore` that changed it, parsed again on first use (an
        error then surfaces where the value is needed, not in the restore)."""
        if self._params is None:
            self._params = load_params(self.path)
        return self._params

    def apply(self, overrides: dict[str, dict[str, Any]]) -> Params:
        """Write `overrides` into params.yaml (`flows.loop.apply_overrides`: merged key by
        key, comments and quoting kept, validated before it is written, so a bad set never
        lands); returns the new value, parsed from the file as written: what the stages
        will read."""
        apply_overrides(self.path, overrides)
        self._params = load_params(self.path)
        return self._params

    def set_family(self, family: str) -> Params:
        """Train `family` from here on (`train.family`)."""
        return self.apply({"train": {"family": family}})

    def snapshot(self) -> str:
        """The file's text now: what `restore` puts back."""
        return self.path.read_text()

    def restore(self, text: str) -> bool:
        """Put a snapshot back; returns whether the file changed (nothing is written when it
        already reads `text`)."""
        if self.path.read_text() == text:
            return False
        with atomic_file(self.path) as tmp:
            tmp.write_text(text)
        self._params = None
        return True

    def __repr__(self) -> str:
        return f"ParamsFile({str(self.path)!r})"
