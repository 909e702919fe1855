"""The one evaluation protocol: full ranking, optimistic and pessimistic ties, streamed in chunks."""
