"""One prompt through a pool of OpenAI-compatible LLMs in parallel, one answer from a judge."""
