"""The limits a deployer sets on ``perceive serve`` (its flags), shared by the API and its connections."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_question_chars: int = 2000
    queue_size: int = 8  # requests waiting for or in inference; one more gets 429 (uploads: see upload_budget)
    timeout_s: float = 60.0
    cache_images: int = 32  # encoded images kept for follow-up questions
    header_timeout_s: float = 10.0  # a request line and headers must arrive within this; else the connection closes
    body_timeout_s: float = 60.0  # a request body must arrive within this; else 408 and the connection closes
    max_connections: int = 512  # open connections at most
