"""What the Wyoming server offers, as its `info` event says it: one speech-to-text program with
each transcription model of the catalog, its languages, and whether it is installed (Home
Assistant offers the languages of installed models only)."""

from __future__ import annotations

from wyoming.info import AsrModel, AsrProgram, Attribution, Info

from dalston import __version__
from dalston.catalog import Catalog
from dalston.services.intake import transcription_problem
from dalston.services.intake.models import ModelService

PROGRAM = "dalston"


def describe(catalog: Catalog, models: ModelService, gateway_url: str) -> Info:
    attribution = Attribution(name="Dalston", url=gateway_url)
    asr_models = [
        AsrModel(name=model.id, attribution=attribution, installed=models.state(model).installed,
                 description=model.name, version=None,
                 languages=list(model.languages or catalog.runtime(model.runtime).languages))
        for model in catalog.models.values() if transcription_problem(catalog, model) is None]
    return Info(asr=[AsrProgram(
        name=PROGRAM, attribution=attribution, installed=True, version=__version__,
        description="Dalston: self-hosted speech-to-text on NATS", models=asr_models,
        # Segments are sent as transcript-chunk events as the engines decode them.
        supports_transcript_streaming=True)])
