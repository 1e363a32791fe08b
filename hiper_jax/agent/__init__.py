"""Plan-Execute agent: prompts, response parsing and token spans."""
