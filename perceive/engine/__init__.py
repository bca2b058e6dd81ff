"""ChatRex's data engine (Sec. 4.1): unlabelled images in, multi-granularity annotations out.

Stages (``perceive.engine.stages``): read, caption, phrases (noun phrases, abstract ones dropped), ground (boxes
per phrase, with scores), describe (region captions: category, short phrase, brief, referring sentence), filter
(low score, duplicate, inconsistent), rewrite (referring expressions) and verify (an expression grounded again
must find its box alone). ``perceive.engine.run.run`` runs them here or on Ray and writes files that
``perceive train --data`` reads (``perceive.engine.output``).
"""

from perceive.engine.stages import EngineConfig, EngineParts

__all__ = ["EngineConfig", "EngineParts"]
