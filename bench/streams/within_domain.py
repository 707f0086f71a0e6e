"""Write CLINC150's within-domain stream: every task adds intents to a product that already has some.

    .venv/bin/python -m bench.streams.within_domain [DOMAINS_JSON] > bench/streams/clinc150_within_domain.json

Each domain's intents, in ``domains.json``'s order, are cut into tasks of ``--per-task`` (5), named
``<domain>-1``, ``<domain>-2``, ...; the stream brings every domain's first task, then every domain's
second, and so on, so the tasks of one domain arrive apart, with other domains' tasks between them.
Tasks are then not separable by topic: routing a text to its task means telling apart intents of one
product, learned at different times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CLINC150_DOMAINS = Path(__file__).resolve().parents[3] / "shared" / "data" / "clinc150" / "domains.json"


def within_domain(domains: dict[str, list[str]], per_task: int) -> dict[str, list[str]]:
    """Each domain's intents in tasks of ``per_task``, the n-th task of every domain before any (n+1)-th."""
    chunks = {
        d: [intents[i : i + per_task] for i in range(0, len(intents), per_task)]
        for d, intents in domains.items()
    }
    rounds = max(len(c) for c in chunks.values())
    return {
        f"{domain}-{n + 1}": chunks[domain][n]
        for n in range(rounds)
        for domain in domains
        if n < len(chunks[domain])
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domains", type=Path, nargs="?", default=CLINC150_DOMAINS)
    parser.add_argument("--per-task", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(within_domain(json.loads(args.domains.read_text()), args.per_task), indent=2))


if __name__ == "__main__":
    main()
