"""The bundled catalog is valid, and a broken catalog file is an error naming file and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest
import yaml

from dalston.catalog import (
    Catalog,
    CatalogError,
    UnknownModel,
    UnknownRuntime,
    is_model_id,
    is_runtime_model_id,
)
from dalston.resources import data_dir

FASTER_WHISPER = ["tiny", "tiny.en", "base", "base.en", "small", "medium", "large-v3",
                  "large-v3-turbo", "distil-large-v3"]
PARAKEET = ["parakeet-tdt-0.6b-v2", "parakeet-tdt-1.1b", "parakeet-ctc-0.6b", "parakeet-rnnt-0.6b"]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def test_bundled_catalog_has_every_runtime_and_model(catalog: Catalog) -> None:
    assert list(catalog.runtimes) == ["audio-prepare", "diarize", "faster-whisper", "merge", "nemo", "redact"]
    assert {m.runtime_model_id for m in catalog.models_for("faster-whisper")} == set(FASTER_WHISPER)
    assert {m.id for m in catalog.models_for("nemo")} == set(PARAKEET)
    assert list(catalog.models) == sorted(catalog.models)


def test_every_model_is_complete(catalog: Catalog) -> None:
    for model in catalog.models.values():
        runtime = catalog.runtime(model.runtime)
        assert model.name and model.description and model.size_bytes > 1_000_000, model.id
        if model.runtime == "diarize":
            continue  # test_diarize_models
        assert runtime.store_dir and runtime.required_files, model.id
        # The Hub comes first everywhere; PyPI packs are the fallback.
        assert model.sources[0].hf is not None, model.id
        assert all(s.local is None for s in model.sources), model.id
        if model.runtime == "faster-whisper":
            assert model.id == f"faster-whisper-{model.runtime_model_id}"
            assert model.hardware.cpu
        else:
            assert model.runtime_model_id == f"nvidia/{model.id}" == model.sources[0].hf.repo
            assert model.sources[0].hf.files == [f"{model.id}.nemo"]
            assert model.languages == ["en"]


def test_the_memory_a_model_takes_is_vram_on_a_gpu_and_ram_on_the_cpu(catalog: Catalog) -> None:
    """What an engine counts against its memory (sdk/models.py), from the `hardware` figures."""
    large = catalog.model("faster-whisper-large-v3").hardware
    assert (large.min_ram_gb, large.min_vram_gb) == (8, 6)
    assert large.memory_bytes("cpu") == 8 * 2**30
    assert large.memory_bytes("cuda") == large.memory_bytes("cuda:1") == 6 * 2**30
    cpu_only = msgspec.structs.replace(large, min_vram_gb=None)
    assert cpu_only.memory_bytes("cuda") == 8 * 2**30


def test_diarize_models(catalog: Catalog) -> None:
    """GE2E's weights (converted to ONNX) ship inside the catalog folder; pyannote's pipeline
    comes from the Hub."""
    ge2e = catalog.model("resemblyzer-ge2e")
    assert [source.label for source in ge2e.sources] == [f"local:{data_dir('catalog') / 'weights/resemblyzer-ge2e'}"]
    assert (data_dir("catalog") / "weights/resemblyzer-ge2e/ge2e.onnx").stat().st_size == ge2e.size_bytes
    community = catalog.model("pyannote-speaker-diarization-community-1")
    assert community.sources[0].hf.repo == community.runtime_model_id == "pyannote/speaker-diarization-community-1"
    assert "HF_TOKEN" in community.description
    assert catalog.runtime("diarize").actor == "actors.diarize.actor:DiarizeActor"


def test_pypi_packs_cover_the_required_files(catalog: Catalog) -> None:
    packs = {m.id: m.sources[1].pypi for m in catalog.models.values() if len(m.sources) > 1}
    assert set(packs) == {"faster-whisper-tiny.en", "faster-whisper-base"}
    required = set(catalog.runtime("faster-whisper").required_files)
    for pack in packs.values():
        assert pack is not None and required <= set(pack.files)
    assert len(packs["faster-whisper-base"].files["model.bin"]) == 2


def test_model_less_runtimes(catalog: Catalog) -> None:
    for runtime_id in ("audio-prepare", "merge"):
        runtime = catalog.runtime(runtime_id)
        assert runtime.store_dir is None and catalog.models_for(runtime_id) == []
    assert catalog.runtime("nemo").actor == "actors.nemo.actor:NemoActor"


def test_whisper_1_means_the_default_model(catalog: Catalog) -> None:
    assert catalog.model("whisper-1", default="faster-whisper-small").id == "faster-whisper-small"
    assert catalog.model("", default="faster-whisper-base").id == "faster-whisper-base"
    assert catalog.model("faster-whisper-tiny", default="faster-whisper-base").id == "faster-whisper-tiny"


def test_unknown_model_lists_valid_ids(catalog: Catalog) -> None:
    with pytest.raises(UnknownModel) as caught:
        catalog.model("whisper-huge")
    assert caught.value.model_id == "whisper-huge"
    assert "faster-whisper-base" in caught.value.valid_ids
    assert "whisper-huge" in str(caught.value) and "parakeet-tdt-0.6b-v2" in str(caught.value)
    with pytest.raises(UnknownRuntime, match="faster-whisper"):
        catalog.runtime("whisperx")


def test_lookup_by_runtime_model_id(catalog: Catalog) -> None:
    assert catalog.by_runtime_model_id("nemo", "nvidia/parakeet-tdt-1.1b").id == "parakeet-tdt-1.1b"
    assert catalog.by_runtime_model_id("faster-whisper", "tiny.en").id == "faster-whisper-tiny.en"
    with pytest.raises(UnknownModel):
        catalog.by_runtime_model_id("nemo", "tiny.en")


@pytest.mark.parametrize(("value", "model_ok", "runtime_ok"), [
    ("faster-whisper-tiny.en", True, True),
    ("nvidia/parakeet-tdt-1.1b", False, True),
    ("../../etc", False, False),
    ("/etc/passwd", False, False),
    ("a/../../b", False, False),
    ("a/b/c", False, False),
    ("a..b", False, False),
    ("a--b", True, False),
    ("tiny\n", False, False),
    ("", False, False),
    ("x" * 129, False, False),
])
def test_id_patterns(value: str, model_ok: bool, runtime_ok: bool) -> None:
    assert is_model_id(value) is model_ok
    assert is_runtime_model_id(value) is runtime_ok


# --- broken catalogs -------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A writable copy of the bundled catalog."""
    copy = tmp_path / "catalog"
    shutil.copytree(data_dir("catalog"), copy)
    return copy


def edit(root: Path, kind: str, name: str, **changes: object) -> None:
    """Rewrite one catalog file; a change to None drops the field."""
    path = root / kind / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    path.write_text(yaml.safe_dump(doc))


def test_copy_loads(root: Path) -> None:
    assert Catalog.load(root).models.keys() == Catalog.load().models.keys()


def test_a_relative_local_source_is_inside_the_catalog_folder(root: Path) -> None:
    edit(root, "models", "faster-whisper-tiny", sources=[{"local": {"path": "weights/tiny"}}])
    [source] = Catalog.load(root).model("faster-whisper-tiny").sources
    assert source.local.path == str(root.resolve() / "weights" / "tiny")


@pytest.mark.parametrize(("kind", "name", "changes", "expected"), [
    ("models", "faster-whisper-tiny", {"size_bytes": "big"}, "Expected `int`, got `str` - at `$.size_bytes`"),
    ("models", "faster-whisper-tiny", {"sise_bytes": 1}, "unknown field `sise_bytes`"),
    ("models", "faster-whisper-tiny", {"runtime_model_id": None}, "missing required field `runtime_model_id`"),
    ("models", "faster-whisper-tiny", {"runtime": "whisperx"}, "unknown runtime 'whisperx'"),
    ("models", "faster-whisper-tiny", {"runtime": "merge"}, "takes no models - at `$.runtime`"),
    ("models", "faster-whisper-tiny", {"id": "faster-whisper-tiny2"}, "does not match the file name - at `$.id`"),
    ("models", "faster-whisper-tiny", {"runtime_model_id": "../../etc"}, "at `$.runtime_model_id`"),
    ("models", "faster-whisper-tiny", {"runtime_model_id": "base"}, "also used by 'faster-whisper-base'"),
    ("models", "faster-whisper-tiny", {"sources": [{"hf": {"repo": "a/b"}, "local": {"path": "/x"}}]},
     "exactly one of `hf`, `pypi`, `local` - at `$.sources[0]`"),
    ("models", "faster-whisper-tiny", {"sources": [{"hf": {"repo": "a/b", "revison": "main"}}]},
     "unknown field `revison` - at `$.sources[0].hf`"),
    ("models", "faster-whisper-tiny", {"sources": [{"local": {"path": "../tiny"}}]},
     "must be absolute or inside the catalog folder"),
    ("models", "faster-whisper-tiny", {"sources": []}, "at `$.sources`"),
    ("runtimes", "nemo", {"store_dir": "../x"}, "at `$.store_dir`"),
    ("runtimes", "nemo", {"chunk_seconds": 0}, "at `$.chunk_seconds`"),
    ("runtimes", "nemo", {"chunk_seconds": "1m"}, "at `$.chunk_seconds`"),
])
def test_broken_file_names_file_and_field(root: Path, kind: str, name: str, changes: dict, expected: str) -> None:
    edit(root, kind, name, **changes)
    with pytest.raises(CatalogError) as caught:
        Catalog.load(root)
    message = str(caught.value)
    assert message.startswith(f"catalog/{kind}/{name}.yaml: "), message
    assert expected in message, message


def test_yaml_syntax_error_names_file(root: Path) -> None:
    (root / "models" / "faster-whisper-base.yaml").write_text("id: [unclosed\n")
    with pytest.raises(CatalogError, match=r"^catalog/models/faster-whisper-base\.yaml: "):
        Catalog.load(root)


def test_adding_a_model_is_adding_a_file(root: Path) -> None:
    doc = yaml.safe_load((root / "models" / "faster-whisper-small.yaml").read_text())
    doc.update(id="faster-whisper-small.en", runtime_model_id="small.en", languages=["en"],
               sources=[{"hf": {"repo": "Systran/faster-whisper-small.en"}}])
    (root / "models" / "faster-whisper-small.en.yaml").write_text(yaml.safe_dump(doc))
    assert Catalog.load(root).model("faster-whisper-small.en").sources[0].label == "hf:Systran/faster-whisper-small.en"
