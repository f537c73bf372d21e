"""The variables ComfyUI fills in a SaveImage filename_prefix, in its two places.

The frontend, when it queues a prompt (its applyTextReplacements): `%NODE.WIDGET%` becomes that
widget's value, NODE being a node's "Node name for S&R" (its class, in an API prompt) or else its
title (`_meta.title`), the first match; characters a file name cannot hold (/ \\ : * ? " < > |)
become "_"; `%date:yyyy-MM-dd%` is the date in the format's yyyy, yy, MM, M, dd, d, hh, h, mm, m,
ss, s. Anything else is left as written. `fill_prompt` does this for the runner, before validation,
so the PNGs embed the filled prompt, as ComfyUI's do.
The server, when it saves (folder_paths.get_save_image_path): %width%, %height% (of the first
image), %year%, %month%, %day%, %hour%, %minute%, %second% (local time, two digits but the year).
`fill_image` does this in SaveImage.
"""
import re
import time

SAVE_NODES = {"SaveImage": "filename_prefix"}  # the frontend's save nodes that headless runs know
UNSAFE = re.compile(r'[/\\:*?"<>|]')
DATE_PARTS = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")


def fill_prompt(prompt, now=None):
    """A copy of `prompt` in which each save node's filename_prefix has its %NODE.WIDGET% and %date:...%
    filled in (the nodes not changed are shared with `prompt`); `prompt` itself when nothing is filled."""
    if not isinstance(prompt, dict):
        return prompt
    filled = dict(prompt)
    for node_id, node in prompt.items():
        name = SAVE_NODES.get(node.get("class_type")) if isinstance(node, dict) else None
        value = node.get("inputs", {}).get(name) if name and isinstance(node.get("inputs"), dict) else None
        if isinstance(value, str) and "%" in value:
            text = re.sub(r"%([^%]+)%", lambda match: _frontend_value(match, prompt, now), value)
            if text != value:
                filled[node_id] = {**node, "inputs": {**node["inputs"], name: text}}
    return filled


def _frontend_value(match, prompt, now):
    parts = match.group(1).split(".")
    if len(parts) != 2:
        if parts[0].startswith("date:"):
            return _date(parts[0][len("date:"):], time.localtime() if now is None else now)
        return match.group(0)
    nodes = [n for n in prompt.values() if isinstance(n, dict) and n.get("class_type") == parts[0]] or \
            [n for n in prompt.values() if isinstance(n, dict) and (n.get("_meta") or {}).get("title") == parts[0]]
    inputs = nodes[0].get("inputs") if nodes else None
    if not isinstance(inputs, dict) or parts[1] not in inputs or isinstance(inputs[parts[1]], list):
        return match.group(0)  # no such node or widget (a linked input has no widget value)
    value = inputs[parts[1]]
    return UNSAFE.sub("_", "" if value is None else _js_string(value))


def _js_string(value):
    """The value as JavaScript's `value + ''` writes it (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _date(form, now):
    def part(match):
        text = match.group(0)
        if text == "yy":
            return str(now.tm_year)[2:]
        if text == "yyyy":
            return str(now.tm_year)
        if text[0] == "y":
            return text
        value = {"d": now.tm_mday, "M": now.tm_mon, "h": now.tm_hour, "m": now.tm_min, "s": now.tm_sec}[text[0]]
        return str(value).zfill(len(text))
    return DATE_PARTS.sub(part, form)


def fill_image(prefix, width, height, now=None):
    """`prefix` with ComfyUI's save-time variables filled in (folder_paths.get_save_image_path)."""
    if "%" not in prefix:
        return prefix
    now = time.localtime() if now is None else now
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
              "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
              "second": f"{now.tm_sec:02}"}
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", str(value))
    return prefix
