"""`python -m core anchors generate`: attribute anchors written by a language model (core.anchors_llm).

    python -m core anchors generate --dataset fashion-mnist --out my_anchors.json
    python -m core anchors generate --classes "cat,dog,fish" --base-url http://localhost:11434/v1 --model llama3.2
    python -m core anchors generate --folder my_images/ --attributes 6

The endpoint comes from --base-url or OPENAI_BASE_URL, the model from --model or STRUCTGUARD_LLM_MODEL,
the key from OPENAI_API_KEY only (a flag would land in the shell history).
"""

from __future__ import annotations

import argparse
import textwrap

from tqdm import tqdm

from .anchors import DATASET_CLASSES, anchor_warnings
from .anchors_llm import (
    BASE_URL_ENV,
    DEFAULT_ATTRIBUTES,
    KEY_ENV,
    MODEL_ENV,
    LLMConfig,
    budget_for,
    classes_for_dataset,
    classes_from_list,
    classes_in_folder,
    generate_anchors,
)
from .cli import command


def _anchors_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="anchors_cmd", required=True, metavar="generate")
    g = sub.add_parser("generate", help="ask a language model for each class's visual attributes",
                       description="Ask an OpenAI-compatible chat model for short visual attributes per class and "
                                   "write an anchor file (the form of assets/anchors/*.json). Only class names are "
                                   f"sent, never images. The API key is read from {KEY_ENV} and never written.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--classes", help='comma-separated class names, e.g. "T-shirt/top,Trouser,Pullover"')
    src.add_argument("--dataset", help=f"a dataset whose classes are known: {', '.join(DATASET_CLASSES)}")
    src.add_argument("--folder", help="a class-per-folder image tree (DIR/<class>/ or DIR/train/<class>/); only "
                                      "the folder names are read")
    g.add_argument("--out", default=None, help="file to write (default: anchors-<dataset>-llm.json here)")
    g.add_argument("--attributes", type=int, default=DEFAULT_ATTRIBUTES, help="attributes per class (1-30)")
    g.add_argument("--base-url", default=None, help=f"the endpoint, e.g. http://localhost:11434/v1 "
                                                    f"(default: ${BASE_URL_ENV})")
    g.add_argument("--model", default=None, help=f"the chat model (default: ${MODEL_ENV})")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply (default 60)")
    g.add_argument("--retries", type=int, default=3, help="retries on HTTP 429 and 5xx, with backoff (default 3)")
    g.add_argument("--encoder", default=None, help="cut each description to this encoder's token budget (loads it; "
                                                   "default: CLIP's 77 tokens, the tightest, without loading)")


@command("anchors", _anchors_args)
def cmd_anchors(args: argparse.Namespace) -> int:
    """Anchor files: `anchors generate` asks a language model for each class's attributes."""
    if args.anchors_cmd == "generate":
        return generate(args)
    raise AssertionError(args.anchors_cmd)


def generate(args: argparse.Namespace) -> int:
    if args.classes is not None:
        dataset, classes = "", classes_from_list(args.classes)
    elif args.dataset is not None:
        dataset, classes = args.dataset.strip().lower(), classes_for_dataset(args.dataset)
    else:
        dataset, classes = classes_in_folder(args.folder)
    config = LLMConfig.from_env(args.base_url, args.model, timeout=args.timeout, retries=max(0, args.retries))
    if args.encoder:
        from .encoders import get_encoder

        budget, budget_name = budget_for(get_encoder(args.encoder))
    else:
        budget, budget_name = budget_for()
    # A progress bar on a terminal only (tqdm's disable=None), cleared when done, so an error stays one line.
    with tqdm(total=len(classes), desc=f"asking {config.model} at {config.host}", unit="class", leave=False,
              disable=None) as bar:
        result = generate_anchors(classes, config, dataset=dataset, n_attributes=args.attributes,
                                  budget=budget, budget_name=budget_name,
                                  on_class=lambda cls, attrs: bar.update())
    path = result.write(args.out or f"anchors-{dataset or 'custom'}-llm.json")
    print(f"wrote {path}: {len(classes)} classes from {config.model} at {config.host} "
          f"(prompt v{result.meta['prompt_version']})")
    width = max(len(c) for c in classes)
    for c in classes:
        attrs = result.texts[c]
        line = textwrap.shorten("; ".join(attrs), 80, placeholder=" ...")
        print(f"  {c:<{width}}  {len(attrs)}: {line}")
        for note in result.notes.get(c, []):
            print(f"  {'':<{width}}  note: {note}")
    for w in anchor_warnings(result.texts):
        print(f"warning: {w}")
    return 0
