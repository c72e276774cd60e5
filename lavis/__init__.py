"""PET-VLM: parameter-efficient fine-tuning and few-shot evaluation of Flamingo-style models (LAVIS-style)."""

from lavis.common.logging import quiet_third_party_warnings

quiet_third_party_warnings()
