"""Layer 1, parallel: this process's rank in an ``mx.distributed`` group and the collectives saepipe uses."""
