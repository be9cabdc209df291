"""cleaned_documents: today's format registry against the previous cleaner, on Debian's python3.11-doc HTML.

    python -m benchmarks.cleaning [--baseline-ref 5901560] [--limit N]

Needs ``apt-get install python3.11-doc`` and, for the previous cleaner, ``pip install -e '.[bench]'``
(langdetect). The previous cleaner and stage are loaded from git history (``--baseline-ref``, the
last commit before the registry) into temporary modules, so nothing old is kept in the tree.

Both stages run over the same warehouse (documents ingested once), in interleaved rounds; the new
stage runs with its per-document time budget (worker process) as in production. Agreement: for
every page, the old blocks' texts matched one-to-one against the new blocks' texts (a multiset
intersection); the figure is matched blocks / max(old blocks, new blocks), over the corpus.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from embedding_assets.core.cleaning import clean_document
from embedding_assets.stages.cleaned_documents import clean_source
from embedding_assets.stages.raw_documents import ingest_source
from resources.warehouse import WarehouseResource

CORPUS = Path("/usr/share/doc/python3.11/html")
BASELINE_REF = "5901560"  # the commit before core/formats/ (regex Markdown/reST, BeautifulSoup HTML, langdetect)


def _module_from_git(ref: str, path: str, name: str, replace: dict[str, str] | None = None) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{ref}:{path}"], check=True, capture_output=True, text=True).stdout
    for old, new in (replace or {}).items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = f"<{ref}:{path}>"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own history
    return module


def _agreement(old_docs, new_docs) -> tuple[int, int]:
    matched = total = 0
    for old, new in zip(old_docs, new_docs):
        old_blocks = collections.Counter(old.text[b.start : b.end] for b in old.blocks) if old else collections.Counter()
        new_blocks = collections.Counter(new.text[b.start : b.end] for b in new.blocks) if new else collections.Counter()
        matched += sum((old_blocks & new_blocks).values())
        total += max(sum(old_blocks.values()), sum(new_blocks.values()))
    return matched, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--limit", type=int, default=0, help="only the first N pages (0 = all)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if importlib.util.find_spec("langdetect") is None:
        sys.exit("the previous cleaner needs langdetect: pip install -e '.[bench]'")
    if not CORPUS.is_dir():
        sys.exit(f"{CORPUS} is missing: apt-get install python3.11-doc")
    old_cleaning = _module_from_git(args.baseline_ref, "embedding_assets/core/cleaning.py", "_old_cleaning")
    old_stage = _module_from_git(
        args.baseline_ref, "embedding_assets/stages/cleaned_documents.py", "_old_cleaned_documents",
        {"embedding_assets.core.cleaning": "_old_cleaning"},
    )  # fmt: skip

    pages = sorted(CORPUS.rglob("*.html"))
    if args.limit:
        pages = pages[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sources"
        (root / "pydoc").mkdir(parents=True)
        for page in pages:
            target = root / "pydoc" / page.relative_to(CORPUS)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(page.read_bytes())
        homes = {"old": Path(tmp) / "old", "new": Path(tmp) / "new"}
        warehouses = {k: WarehouseResource(home=str(v)) for k, v in homes.items()}
        for warehouse in warehouses.values():
            ingest_source(warehouse, root, "pydoc", max_file_bytes=50 * 1024 * 1024)
        seconds: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for name, run in (("old", old_stage.clean_source), ("new", clean_source)):
                with warehouses[name].connect() as con:  # clean everything again each round
                    con.execute("DELETE FROM cleaned_documents")
                    con.execute("DELETE FROM quarantine")
                started = time.perf_counter()
                report = run(warehouses[name], "pydoc")
                seconds[name].append(time.perf_counter() - started)
                print(f"{name}: {seconds[name][-1]:.2f} s, {report.cleaned} cleaned, {len(report.quarantined)} quarantined", flush=True)

    def cleaned(fn, data):
        try:
            return fn(data, ".html")
        except Exception:  # noqa: BLE001 - a refused page counts as zero blocks
            return None

    datas = [p.read_bytes() for p in pages]
    old_docs = [cleaned(old_cleaning.clean_document, d) for d in datas]
    new_docs = [cleaned(clean_document, d) for d in datas]
    matched, total = _agreement(old_docs, new_docs)
    same_language = sum(1 for o, n in zip(old_docs, new_docs) if o and n and o.language == n.language)
    old_s, new_s = min(seconds["old"]), min(seconds["new"])
    print(f"pages: {len(pages)} ({sum(map(len, datas)) / 1e6:.1f} MB)")
    print(f"cleaned_documents stage, best of {args.rounds}: previous {old_s:.2f} s, registry {new_s:.2f} s, speed-up {old_s / new_s:.2f}x")
    print(f"block agreement: {matched}/{total} = {matched / total:.4f}")
    print(f"same language: {same_language}/{len(pages)}")


if __name__ == "__main__":
    main()
