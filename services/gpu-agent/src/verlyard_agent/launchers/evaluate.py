# pyright: reportMissingImports=false, reportMissingModuleSource=false
"""Launcher (run by the trainer's Python, never imported by the agent): evaluate a Hugging Face model folder.

    python evaluate.py --model <hf dir> --val-files a.parquet [b.parquet] --out result.json
                       [--max-length 1024] [--batch-size 8] [--max-samples 256] [--generate 16]
                       [--max-new-tokens 64] [--device auto|cpu|cuda]

On the validation split (verl's SFT parquet: a `messages` column), the loss is the mean negative
log-likelihood of the assistant tokens of the last turn given the chat-templated conversation before it
(what SFT trains), and perplexity is exp(loss). When rows have answers (the last assistant turn, or
`reward_model.ground_truth` in RL data with a `prompt` column), the first `--generate` prompts are
answered greedily and compared: `exact_match` (whitespace- and case-normalised equality) and
`contains_answer` (the reference appears in the output). Writes one JSON object to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any


def _normalise(text: str) -> str:
    return " ".join(str(text).split()).lower()


def _as_messages(value: Any) -> list[dict[str, str]] | None:
    if value is None:
        return None
    items = list(value.tolist() if hasattr(value, "tolist") else value)
    out: list[dict[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            return None
        out.append({"role": str(item["role"]), "content": str(item["content"])})
    return out or None


def _token_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
    return [int(i) for i in encoded["input_ids"]]


def load_rows(files: list[str], max_samples: int) -> list[dict[str, Any]]:
    """(prompt messages, reference answer or None) rows from SFT or RL parquet files."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for path in files:
        frame = pd.read_parquet(path)
        for record in frame.to_dict("records"):
            messages = _as_messages(record.get("messages"))
            if messages is not None:
                if messages[-1]["role"] == "assistant" and len(messages) > 1:
                    rows.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
                continue
            prompt = _as_messages(record.get("prompt"))
            if prompt is not None:
                reward = record.get("reward_model")
                truth = reward.get("ground_truth") if isinstance(reward, dict) else None
                rows.append({"prompt": prompt, "answer": None, "ground_truth": truth})
            if len(rows) >= max_samples:
                break
        if len(rows) >= max_samples:
            break
    return rows[:max_samples]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a Hugging Face model folder on a validation split.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--val-files", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32 if device == "cpu" else "auto")
    model.to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows = load_rows(args.val_files, args.max_samples)
    if not rows:
        print("evaluate: no usable rows in the validation split", file=sys.stderr)
        return 2

    # Loss over the answer tokens, teacher-forced, in batches of right-padded sequences.
    scored = [r for r in rows if r["answer"] is not None]
    nll_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(scored), args.batch_size):
            batch = scored[start : start + args.batch_size]
            seqs: list[list[int]] = []
            masks: list[list[int]] = []
            for row in batch:
                prompt_ids = _token_ids(tokenizer, row["prompt"], generation_prompt=True)
                answered = [*row["prompt"], {"role": "assistant", "content": row["answer"]}]
                full_ids = _token_ids(tokenizer, answered, generation_prompt=False)[: args.max_length]
                label_mask = [0] * min(len(prompt_ids), len(full_ids)) + [1] * max(0, len(full_ids) - len(prompt_ids))
                seqs.append(full_ids)
                masks.append(label_mask)
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            labels = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
                input_ids[i, : len(seq)] = torch.tensor(seq)
                attention[i, : len(seq)] = 1
                labels[i, : len(seq)] = torch.tensor(mask)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = input_ids[:, 1:]
            weight = labels[:, 1:].float()
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll_sum += float((nll * weight).sum())
            tokens += int(weight.sum())

    result: dict[str, Any] = {"samples": len(rows), "scored_samples": len(scored), "scored_tokens": tokens}
    if tokens:
        result["val_loss"] = nll_sum / tokens
        result["perplexity"] = math.exp(min(result["val_loss"], 700.0))

    # Greedy answers for the first few prompts that have a reference.
    with_refs = [r for r in rows if r["answer"] is not None or r.get("ground_truth") is not None][: args.generate]
    exact = contains = 0
    examples: list[dict[str, str]] = []
    with torch.no_grad():
        for row in with_refs:
            reference = str(row["answer"] if row["answer"] is not None else row["ground_truth"])
            prompt_ids = _token_ids(tokenizer, row["prompt"], generation_prompt=True)
            ids = torch.tensor([prompt_ids], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)
            exact += int(_normalise(text) == _normalise(reference))
            contains += int(_normalise(reference) in _normalise(text))
            if len(examples) < 3:
                examples.append({"reference": reference, "output": text})
    if with_refs:
        result["generated"] = len(with_refs)
        result["exact_match"] = exact / len(with_refs)
        result["contains_answer"] = contains / len(with_refs)
        result["examples"] = examples
    result["seconds"] = round(time.monotonic() - started, 3)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    print("evaluate: " + json.dumps({k: v for k, v in result.items() if k != "examples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
