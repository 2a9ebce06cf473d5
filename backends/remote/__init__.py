"""Models served by other servers (vLLM, SGLang, llama-server, TGI, Ollama, another Parley) behind
Parley's front door: the spec of one remote model, its replicas and routing, the wire mapping per
upstream kind, and the engine that speaks it."""
