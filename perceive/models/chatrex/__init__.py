"""ChatRex / RexSeek, the retrieval model: the LLM answers with the indices of proposal boxes."""
