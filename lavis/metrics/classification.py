"""Rank-classification metrics of OpenFlamingo v2's suite (``evaluate_classification``, open_flamingo @ 655f693).

The model gives, per sample, one log-likelihood per class name (the mean log-probability per class-name
token, ``normalize_length=True``); these functions turn them into the published metrics:

* Hateful Memes, classes ``["no", "yes"]``: ``top = topk(l, 1)`` (a tie picks "no"), ``pred_score =
  exp(l[top] - logsumexp(l))`` in float32, ``p_yes = pred_score`` if "yes" won else ``1 - pred_score``;
  ROC AUC of ``p_yes`` against the labels (scikit-learn; ties count one half).
* ImageNet: ``torch.topk(scores, k=5)`` on a CPU float32 ``(B, 1000)`` tensor (its order among exactly
  equal scores is torch's); top-1 / top-5 are correct when the GT class *name* is the first / among the
  five names, so two classes sharing a name ("missile" 657 and 744) count as the same answer.

CLI: ``python -m lavis.metrics.classification --task hateful_memes|imagenet --scores S.jsonl``, one JSON line
per sample ``{"id", "label": GT class index, "class_logprobs": [one per class]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from lavis.common.errors import DataError, UserError
from lavis.common.fileio import read_json_lines

HATEFUL_MEMES_CLASSES = ("no", "yes")


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names in index order (open_clip's ``IMAGENET_CLASSNAMES``, which OpenFlamingo uses).

    Names repeat: "missile" (657, 744) and "sunglasses" (836, 837).
    """
    from importlib.resources import files

    return json.loads(files("lavis.datasets").joinpath("imagenet_classnames.json").read_text(encoding="utf-8"))


def _scores_tensor(class_logprobs: Sequence[Sequence[float]] | torch.Tensor, num_classes: int) -> torch.Tensor:
    scores = torch.as_tensor(class_logprobs, dtype=torch.float32).cpu()
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise DataError(f"class scores must have shape (samples, {num_classes}), got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        row = int((~torch.isfinite(scores)).any(dim=1).nonzero()[0])
        raise DataError(f"class scores of sample #{row} are not all finite: {scores[row].tolist()[:10]}")
    return scores


def hateful_memes_p_yes(class_logprobs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_yes, predicted class index)`` per sample from ``(N, 2)`` log-likelihoods of ("no", "yes")."""
    scores = _scores_tensor(class_logprobs, 2)
    top_score, top = scores.topk(1, dim=1)
    pred_score = torch.exp(top_score[:, 0] - torch.logsumexp(scores, dim=1))
    pred = top[:, 0]
    return torch.where(pred == 1, pred_score, 1 - pred_score), pred


def roc_auc(labels: Sequence[int], p_yes) -> float:
    """ROC AUC of ``p_yes`` against 0/1 labels (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    labels = [int(v) for v in labels]
    if len(set(labels)) < 2:
        raise DataError(f"ROC AUC needs both labels among the scored samples, got only {sorted(set(labels))}")
    return float(roc_auc_score(labels, torch.as_tensor(p_yes).double().numpy()))


def hateful_memes_metrics(labels: Sequence[int], class_logprobs) -> dict:
    """``{"roc_auc", "accuracy", "p_yes", "pred"}`` (the last two per sample) for Hateful Memes."""
    p_yes, pred = hateful_memes_p_yes(class_logprobs)
    correct = sum(int(p) == int(y) for p, y in zip(pred.tolist(), labels))
    return {
        "roc_auc": roc_auc(labels, p_yes),
        "accuracy": correct / len(labels),
        "p_yes": p_yes.tolist(),
        "pred": pred.tolist(),
    }


def topk_classes(class_logprobs, k: int = 5, num_classes: int | None = None) -> torch.Tensor:
    """``torch.topk(scores, k).indices`` on a CPU float32 ``(B, C)`` tensor (torch's tie order)."""
    scores = torch.as_tensor(class_logprobs, dtype=torch.float32).cpu()
    scores = _scores_tensor(scores, num_classes or scores.shape[-1])
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def imagenet_metrics(labels: Sequence[int], class_logprobs, classnames: Sequence[str]) -> dict:
    """``{"top1_accuracy", "top5_accuracy", "top5"}`` with correctness by class *name* (see module docstring)."""
    top5 = topk_classes(class_logprobs, 5, len(classnames)).tolist()
    names = list(classnames)
    top1_ok = [names[t[0]] == names[y] for t, y in zip(top5, labels)]
    top5_ok = [names[y] in {names[i] for i in t} for t, y in zip(top5, labels)]
    return {
        "top1_accuracy": sum(top1_ok) / len(labels),
        "top5_accuracy": sum(top5_ok) / len(labels),
        "top5": top5,
        "top1_correct": top1_ok,
        "top5_correct": top5_ok,
    }


def read_scores(path: str, num_classes: int) -> tuple[list, list[int], list[list[float]]]:
    """``(ids, labels, class_logprobs)`` from a JSONL scores file; DataError naming the line when malformed."""
    ids, labels, scores = [], [], []
    for lineno, rec in read_json_lines(path, "class scores file"):
        if isinstance(rec, dict) and "id" not in rec and "doc_id" in rec:  # a samples_*.jsonl line
            rec["id"] = rec["doc_id"]
        if not isinstance(rec, dict) or not {"id", "label", "class_logprobs"} <= set(rec):
            raise DataError(f"{path}:{lineno}: expected an object with id, label, class_logprobs: {rec!r:.120}")
        label, row = rec["label"], rec["class_logprobs"]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
            raise DataError(f"{path}:{lineno}: label must be a class index in [0, {num_classes}), got {label!r}")
        if not isinstance(row, list) or len(row) != num_classes:
            raise DataError(f"{path}:{lineno}: class_logprobs must be a list of {num_classes} numbers")
        ids.append(rec["id"])
        labels.append(label)
        scores.append(row)
    if not ids:
        raise DataError(f"{path}: no samples to score")
    return ids, labels, scores


def main(argv: list[str] | None = None) -> int:
    """CLI: print the classification metrics of a per-sample class-scores file as one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m lavis.metrics.classification", description=main.__doc__)
    parser.add_argument("--task", required=True, choices=["hateful_memes", "imagenet"])
    parser.add_argument(
        "--scores", required=True, help='JSON lines {"id", "label": class index, "class_logprobs": [one per class]}'
    )
    parser.add_argument("--classnames", help="JSON list of class names (imagenet; default: the 1000 ImageNet names)")
    args = parser.parse_args(argv)
    try:
        if args.task == "hateful_memes":
            _, labels, scores = read_scores(args.scores, 2)
            metrics = hateful_memes_metrics(labels, scores)
            out = {"roc_auc": metrics["roc_auc"], "accuracy": metrics["accuracy"], "n": len(labels)}
        else:
            if args.classnames:
                from lavis.common.fileio import read_json

                names = read_json(args.classnames, "class names file")
            else:
                names = imagenet_classnames()
            _, labels, scores = read_scores(args.scores, len(names))
            metrics = imagenet_metrics(labels, scores, names)
            out = {
                "top1_accuracy": metrics["top1_accuracy"],
                "top5_accuracy": metrics["top5_accuracy"],
                "n": len(labels),
            }
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
