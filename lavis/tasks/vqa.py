"""Visual question answering: generate a short answer, score with the official VQAv2 accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lavis.common.registry import registry
from lavis.metrics.postprocess import postprocess_answer, vqa_postprocessor
from lavis.tasks.base import BaseTask, FewShotConfig, GenerationConfig, InContextTrainingConfig

# VQAv2's answer types (the keys of the official evaluation's perAnswerType).
ANSWER_TYPES = ("yes/no", "number", "other")


@registry.register_task("vqa")
class VQATask(BaseTask):
    """VQAv2-style open-ended VQA; records are ``{"question_id", "answer"}``."""

    sample_id_key = "question_id"

    @dataclass
    class Config(GenerationConfig, FewShotConfig, InContextTrainingConfig):
        """VQA keys of the ``run`` section (decoding defaults follow OpenFlamingo's VQAv2 protocol)."""

        max_new_tokens: int = 5  # generation stops at <|endofchunk|> or after this many new tokens
        # Normalise answers even when all ten GT answers agree (not official: by default "Yes" vs "yes" is 0).
        always_normalize: bool = False
        # Generation -> answer: openflamingo_v2 = cut at Question/Answer/Short then at ", " (exactly v2's,
        # no strip; lavis/metrics/postprocess.py); the default also strips the result.
        vqa_postprocess: Literal["default", "openflamingo_v2"] = "default"
        # Stem the answer after post-processing: okvqa = OpenFlamingo's OK-VQA stemmer (needs nltk data).
        vqa_stemmer: Literal["none", "okvqa"] = "none"
        # official: VQAv2's vqaEval.py rules; openflamingo_v2: v2's vqa_metric.py (always normalises,
        # missing answer_type = "other", VizWiz's leave-one-out by dict equality). OK-VQA, TextVQA, VizWiz: v2.
        vqa_metric: Literal["official", "openflamingo_v2"] = "official"
        # Answer shown in a demonstration: "answer" (the most frequent) or "first" (answers[0], OpenFlamingo's).
        vqa_demo_answer: Literal["answer", "first"] = "answer"

        def metric_names(self) -> list[str]:
            return ["agg_metrics", "overall", *(f"answer_type/{t}" for t in ANSWER_TYPES)]

    def collator(self, model, role: str):
        from lavis.datasets.collators import VQACollator

        return VQACollator(
            model.tokenizer,
            role=role,
            demo_answer=self.run_cfg.vqa_demo_answer,
            demo_separator=self.run_cfg.demo_separator,
        )

    def postprocess(self, texts: list[str]) -> list[str]:
        """Answers from raw generations, per ``run.vqa_postprocess`` and ``run.vqa_stemmer``."""
        run = self.run_cfg
        protocol, stemmer = run.vqa_postprocess, run.vqa_stemmer
        if protocol == "default" and stemmer == "none":
            return [postprocess_answer(t) for t in texts]
        if protocol == "default":
            return vqa_postprocessor("none", stemmer)([postprocess_answer(t) for t in texts])
        return vqa_postprocessor(protocol, stemmer)(texts)

    def valid_step(self, model, batch) -> list[dict]:
        return self.records(batch, self.generate_text(model, batch))

    def records(self, batch, texts: list[str]) -> list[dict]:
        """Result records of a batch from its generated texts."""
        return [
            # resps: the raw generation, for the per-sample log (lavis/runners/sample_log.py)
            {"question_id": int(qid), "answer": answer, "resps": text}
            for qid, text, answer in zip(batch["question_id"], texts, self.postprocess(texts))
        ]

    def evaluate(self, records: list[dict], split: str, dataset, result_dir=None) -> dict:
        from lavis.metrics.vqa import vqa_sample_scores, write_vqa_results
        from lavis.runners.sample_log import SAMPLES_KEY

        path = self.result_path(result_dir, split, "_vqa")
        if path is not None:
            write_vqa_results(records, path)
        if dataset.annotation_file is None:
            # test-dev has no public answers: the results file is the submission, there is nothing to score.
            return {"agg_metrics": None, "num_answers": len(records)}
        accuracy, per_question = vqa_sample_scores(
            dataset.question_file,
            dataset.annotation_file,
            records,
            always_normalize=self.run_cfg.always_normalize,
            metric=self.run_cfg.vqa_metric,
        )
        metrics = {"overall": accuracy["overall"], "agg_metrics": accuracy["overall"]}
        metrics.update({f"answer_type/{k}": v for k, v in accuracy["perAnswerType"].items()})
        metrics[SAMPLES_KEY] = per_question
        return metrics
