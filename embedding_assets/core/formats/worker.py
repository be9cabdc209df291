"""A cleaning worker process: ``python -m embedding_assets.core.formats.worker``.

Reads ``(bytes, suffix)`` requests and answers ``("ok", CleanedDocument)`` or ``("error", reason)``,
pickled with ``multiprocessing.connection`` framing over its stdin/stdout (stdout is re-pointed at
stderr first, so a library that prints cannot corrupt the stream). It sends ``("ready", None)`` once
its parsers and the language model are loaded. The stage runs it as a subprocess so it can kill a
document that overruns the time budget; a subprocess started with ``-m`` never re-imports the
caller's main module (as multiprocessing's spawn would).
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection


def serve(requests: Connection, answers: Connection) -> None:
    from embedding_assets.core.cleaning import CleaningError, clean_document, detect_language

    # Load what first use would load (language model, lazily imported PDF and DOCX libraries), so no
    # document's budget pays for it.
    import docx  # noqa: F401
    import pypdf  # noqa: F401

    detect_language("warm up the language model before the first budgeted document")
    answers.send(("ready", None))
    while True:
        try:
            data, suffix = requests.recv()
        except EOFError:
            return
        try:
            answers.send(("ok", clean_document(data, suffix)))
        except CleaningError as exc:
            answers.send(("error", str(exc)))
        except RecursionError:
            answers.send(("error", f"{suffix} document nested too deeply to parse"))
        except Exception as exc:  # noqa: BLE001 - a parser bug on one document must not stop the source
            answers.send(("error", f"the {suffix} parser failed: {type(exc).__name__}: {exc}"))


def main() -> None:
    answers_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the answers
    sys.stdout = sys.stderr
    serve(Connection(os.dup(0)), Connection(answers_fd))


if __name__ == "__main__":
    main()
