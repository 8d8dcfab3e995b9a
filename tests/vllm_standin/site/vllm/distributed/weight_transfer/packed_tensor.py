"""``packed_nccl_broadcast_producer`` as TRL's ``VLLMClient`` calls it: one broadcast per tensor, in order."""


def packed_nccl_broadcast_producer(iterator, group, src=0, post_iter_func=lambda item: item, **ignored):
    for item in iterator:
        group.broadcast(post_iter_func(item), src)
