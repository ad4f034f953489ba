"""Write the English prose of the interpreter's pydoc topics (pydoc_data/topics.py, a dict of help texts)
to one text file per topic, a second source beside the standard library's Python code for `mixturelm ensemble lm`.

    python benchmarks/ensemble/pydoc_topics.py runs/data/pydoc-topics
"""

import sys
from pathlib import Path

from pydoc_data.topics import topics

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/data/pydoc-topics")
out.mkdir(parents=True, exist_ok=True)
for name, text in sorted(topics.items()):
    (out / f"{name}.txt").write_text(text, encoding="utf-8")
print(f"{len(topics)} topics, {sum(len(t) for t in topics.values()):,} characters -> {out}")
