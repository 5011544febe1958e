"""What prefill and decode nodes share: the link to the coordinator, KV transfer
threads, the counter-ordered local queue, and the process set-up (``NodeSettings``)."""
