"""Engine loading shared by both runtimes (imports neither asyncio nor gevent)."""

from __future__ import annotations

from agent.config import Config
from agent.dialog.policy import DialogPolicy
from agent.engine.bundle import EngineBundle


def load_engines(config: Config) -> EngineBundle:
    """Load the engines, pre-synthesize every fixed phrase and pre-fill the LLM prompt cache."""
    policy = DialogPolicy(config.agent)
    engines = EngineBundle.load(config, policy.fixed_phrases())
    engines.load_times_s["llm_warm"] = engines.warm_llm(policy.llm_messages([], "Hello."))
    return engines
