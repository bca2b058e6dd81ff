"""The API's description as one self-contained HTML page (``GET /docs``): it must work offline, so no script and
no external URL, unlike FastAPI's Swagger and ReDoc pages."""

from __future__ import annotations

import html


def docs_page(schema: dict) -> str:
    """A self-contained HTML page describing the API from its OpenAPI schema: no script, no external URL."""
    esc = html.escape
    info = schema.get("info", {})
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(info.get('title', 'API'))} API</title><style>body{{font:15px/1.45 system-ui,sans-serif;",
        "max-width:60em;margin:2em auto;padding:0 1em}code,pre{background:#f3f3f3;padding:1px 4px}",
        "td,th{text-align:left;vertical-align:top;padding:2px 10px 2px 0}h2{margin-top:1.6em}</style></head><body>",
        f"<h1>{esc(info.get('title', 'API'))} {esc(str(info.get('version', '')))}</h1>",
        f"<p>{esc(info.get('description', ''))}</p><p>The machine-readable description: <a href='openapi.json'>",
        "openapi.json</a>.</p>",
    ]
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            parts.append(f"<h2><code>{esc(method.upper())} {esc(path)}</code></h2><p>{esc(op.get('summary', ''))}</p>")
            if op.get("description"):
                parts.append(f"<p>{esc(op['description'])}</p>")
            for content_type, body in op.get("requestBody", {}).get("content", {}).items():
                props = body.get("schema", {}).get("properties", {})
                required = set(body.get("schema", {}).get("required", []))
                if props:
                    parts.append(f"<p>Request body: <code>{esc(content_type)}</code></p><table>")
                    parts.append("<tr><th>field</th><th>type</th><th></th></tr>")
                    for name, prop in props.items():
                        kind = prop.get("format", prop.get("type", ""))
                        need = "required; " if name in required else ""
                        parts.append(f"<tr><td><code>{esc(name)}</code></td><td>{esc(str(kind))}</td>"
                                     f"<td>{esc(need + prop.get('description', ''))}</td></tr>")  # fmt: skip
                    parts.append("</table>")
            responses = op.get("responses", {})
            if responses:
                parts.append("<table><tr><th>status</th><th>meaning</th></tr>")
                for status, response in responses.items():
                    parts.append(f"<tr><td>{esc(str(status))}</td><td>{esc(response.get('description', ''))}</td></tr>")
                parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
