"""Which sample each rank reads at each step, and the random bits of each sample.

The order is a pure function of the seed and of each sample's GLOBAL position, never of the rank
that reads it, so a run may resume on another number of ranks and still see the same samples:

- global sample `g = step * G + j`, `j` in [0, G), `G = world_size * batch_size * accumulation`
  (`BatchLayout`, the one place the global batch is computed: trainer.config compares it on resume);
  rank `r`'s micro-step `a` takes `j` in `[(r*A + a) * B, (r*A + a + 1) * B)`, so each rank reads one
  contiguous slice of `A * B` samples per step, micro-step by micro-step;
- sample `g` is entry `order(epoch)[position]` with `epoch, position = divmod(g, num_items)`, each
  epoch one seeded permutation of the training entries (`DrawOrder`);
- every random bit of sample `g` comes from generators keyed by (seed, stream, g): its window start
  and latent noise (stream 1, trainer.data), its diffusion timestep, noise and label dropout (stream
  2, the trainer), its VAE posterior noise in video mode (stream 4).

With equal global batches the only thing a new layout changes is how the float sums of one step are
split (per micro-batch, accumulated, all-reduced), so the losses agree to float32 rounding. The
sampler's whole state is one integer (the next `g`), a resumed run starts reading at exactly the
next sample, and the data workers may run in any order without changing what is read.
"""
import numpy as np

# random streams keyed by (seed, stream, global sample index)
DATA_STREAM, DIFFUSION_STREAM, POSTERIOR_STREAM = 1, 2, 4


def sample_rng(seed, stream, index):
    """The generator for one global sample's random bits of one stream."""
    return np.random.default_rng([seed, stream, int(index)])


class DrawOrder:
    """Which item global sample `g` is, and the generator for that sample's data random bits."""

    def __init__(self, num_items, seed):
        if num_items < 1:
            raise ValueError("a draw order needs at least one training entry")  # plan_items guarantees one
        self.num_items, self.seed = num_items, seed
        self.per_epoch = num_items  # every entry once per epoch, however many ranks read them
        self._cache = {}

    def epoch_order(self, epoch):
        order = self._cache.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            # a step may straddle two epochs, and the readers run ahead: keep the last few
            self._cache = {e: o for e, o in self._cache.items() if e >= epoch - 2}
            self._cache[epoch] = order
        return order

    def position(self, draw):
        """(epoch, position within the epoch) of global sample `draw`."""
        return divmod(int(draw), self.per_epoch)

    def item(self, draw):
        epoch, pos = self.position(draw)
        return int(self.epoch_order(epoch)[pos])

    def rng(self, draw):
        return sample_rng(self.seed, DATA_STREAM, draw)


class BatchLayout:
    """How global samples map onto (step, rank, micro-step): see the module docstring.

    `G` (global_batch) is the only number that fixes what a run computes; world size, batch size
    and accumulation may trade against each other on resume."""

    def __init__(self, world_size, batch_size, accumulation, rank=0):
        self.world_size, self.batch_size, self.accumulation, self.rank = world_size, batch_size, accumulation, rank
        self.per_rank = batch_size * accumulation
        self.global_batch = world_size * self.per_rank

    def index(self, first, step, k):
        """Global index of this rank's `k`-th sample (in reading order) of step `step`, counted from
        the step whose first sample is `first`."""
        return first + step * self.global_batch + self.rank * self.per_rank + k

    def micro_indices(self, first, step, micro):
        """Global indices of this rank's micro-step `micro` of step `step` (counted from the step
        whose first sample is `first`)."""
        lo = self.index(first, step, micro * self.batch_size)
        return np.arange(lo, lo + self.batch_size, dtype=np.int64)

    def rank_draws(self, first, num_steps):
        """The global indices this rank reads for `num_steps` steps from `first`, in reading order."""
        return RankDraws(self, first, num_steps)


class RankDraws:
    """A lazy sequence of global indices (a long run has too many to list)."""

    def __init__(self, layout, first, num_steps):
        self.layout, self.first, self.num_steps = layout, first, num_steps

    def __len__(self):
        return self.num_steps * self.layout.per_rank

    def _at(self, k):
        return self.layout.index(self.first, *divmod(k, self.layout.per_rank))

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self._at(i) for i in range(len(self))[k]]
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._at(k)
