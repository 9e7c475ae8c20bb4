"""Griffe extension for the API reference: read a Google-style ``Example:`` section like
``Examples:``, so its ``>>>`` lines render as code (griffe treats the singular title as a
plain admonition, where ``>>>`` would become nested block quotes)."""

from __future__ import annotations

import re
from typing import Any

import griffe

SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = SINGULAR.sub(r"\1Examples:", obj.docstring.value)
