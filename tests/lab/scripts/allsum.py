"""An unmodified mx.distributed script: no macrun import, just MLX's own env contract (MLX_RANK, MLX_HOSTFILE).

Every rank contributes rank+1 to an all_sum and its rank to an all_gather, then prints one line;
with world size n the sum is n(n+1)/2 and the gather is 0..n-1.
"""

import mlx.core as mx

group = mx.distributed.init()
rank, size = group.rank(), group.size()
total = mx.distributed.all_sum(mx.array([float(rank + 1)]))
gathered = mx.distributed.all_gather(mx.array([float(rank)]))
mx.eval(total, gathered)
print(f"world={size} rank={rank} sum={total.item():g} gather={[int(x) for x in gathered.tolist()]}", flush=True)
