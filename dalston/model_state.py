"""A model's state, worked out in one place: its catalog entry, whether it is installed, which
engines hold it loaded, and its latest pull. The gateway serves it as an OpenAI model object,
the dashboard shows it, and the CLI lists it from the local store when no gateway answers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from dalston.catalog import ModelSpec, RuntimeSpec
from dalston.contracts import Heartbeat, PullProgress
from dalston.store import ModelStore


@dataclass(frozen=True)
class ModelState:
    spec: ModelSpec
    installed: bool
    # Engines that hold the model loaded.
    loaded_on: list[str]
    # The latest progress of a pull under way, or just ended; None if none was seen.
    pull: PullProgress | None = None

    @classmethod
    def of(cls, spec: ModelSpec, runtime: RuntimeSpec, store: ModelStore, live: Iterable[Heartbeat] = (),
           pull: PullProgress | None = None) -> ModelState:
        """What this machine's `store`, the heartbeats of `live` engines and the latest `pull`
        say of the model `spec` of `runtime`."""
        beats = [beat for beat in live if beat.runtime == spec.runtime]
        installed = (store.is_installed(runtime, spec.runtime_model_id)
                     # Engines on other hosts may have stores of their own: trust what they report.
                     or any(spec.runtime_model_id in beat.models_on_disk for beat in beats)
                     # A pull that ended installed, perhaps into a store on another host.
                     or (pull is not None and pull.status == "installed"))
        loaded_on = [beat.engine for beat in beats if any(m.model == spec.id for m in beat.loaded_models)]
        return cls(spec, installed, loaded_on, pull)

    def openai_object(self) -> dict[str, Any]:
        """The OpenAI model object, plus what Dalston knows of the model."""
        spec = self.spec
        return {
            "id": spec.id, "object": "model", "created": 0, "owned_by": spec.runtime,
            "runtime": spec.runtime, "runtime_model_id": spec.runtime_model_id,
            "name": spec.name, "description": spec.description, "languages": spec.languages,
            "capabilities": msgspec.to_builtins(spec.capabilities),
            "hardware": msgspec.to_builtins(spec.hardware),
            "size_bytes": spec.size_bytes, "installed": self.installed, "loaded_on": self.loaded_on,
            "pull": None if self.pull is None else msgspec.to_builtins(self.pull),
        }
