"""A self-contained HTML page from the run's Markdown report.

The Markdown is the single source of the report's content; this renders it
with python-markdown (tables extension) and inlines every PNG as a data URI,
so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.7em; }
th { background: #f6f8fa; }
td { text-align: right; } td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f8fa; padding: 0 0.25em; }
"""


def markdown_to_html(markdown_text: str, base_dir: Path, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"', lambda m: _inline(m, base_dir), body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _inline(match, base_dir: Path) -> str:
    alt, src = match.group(1), match.group(2)
    path = base_dir / src
    if src.startswith("data:") or not path.exists():
        return match.group(0)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{alt}" src="data:image/png;base64,{data}"'
