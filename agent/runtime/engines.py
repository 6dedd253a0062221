"""Engine loading shared by both runtimes (imports neither asyncio nor gevent)."""

from __future__ import annotations

from agent.call.session import SATISFACTION_PROMPT, SATISFACTION_THANKS
from agent.config import Config
from agent.dialog.policy import DialogPolicy
from agent.engine.bundle import EngineBundle


def load_engines(config: Config) -> EngineBundle:
    """Load the engines, pre-synthesize every fixed phrase and pre-fill the LLM prompt cache.

    The naive baseline (``naive: true``) keeps no phrase cache: every phrase is synthesized
    when it is said.
    """
    policy = DialogPolicy(config.agent)
    phrases = list(policy.fixed_phrases())
    if config.kpi.satisfaction:
        phrases += [SATISFACTION_PROMPT, SATISFACTION_THANKS]
    engines = EngineBundle.load(config, phrases, cache_phrases=not config.naive)
    engines.load_times_s["llm_warm"] = engines.warm_llm(policy.llm_messages([], "Hello."))
    return engines
