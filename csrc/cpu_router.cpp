/*
 * Softmax top-k routing (routing.SoftmaxTopK) for the executor's job, so that a layer of
 * every expert in one call routes in C just before its pairs are grouped, not in two torch ops
 * of a microsecond or more each.
 *
 * The experts chosen are torch.topk's, ties included: its CPU loop (aten's topk_impl_loop)
 * step for step, on the same libstdc++ algorithms with the same comparator (largest first, NaN
 * above all). Which of two equal logits wins is up to those algorithms, and exact mode must
 * choose what stock vLLM, routing with torch.topk, chooses. The weights are the softmax of the
 * k chosen logits (renormalised), or their share of the softmax over all experts, in fp32; they
 * may differ from torch's in the last bit (its vectorised exp).
 *
 * C++ for std::nth_element and friends alone: no exceptions, no allocation (the caller's scratch).
 */
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

extern "C" {
#include "cpu_common.h"
}

namespace {

using Entry = std::pair<float, int64_t>; /* aten's elem_t for float and bf16 logits */
static_assert(sizeof(Entry) == ROUTER_ENTRY_BYTES, "the scratch holds one Entry per expert");

struct Larger { /* aten's TopKComparator<elem_t, largest = true> */
    bool operator()(const Entry &a, const Entry &b) const {
        return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
    }
};

/* torch.topk(row, k, largest=True, sorted=True): the k entries of `queue` (n entries of room) */
void top_k(const float *row, int64_t n, int64_t k, Entry *queue) {
    Larger larger;
    if (k * 64 <= n) { /* a heap of k, as aten does for k small against n */
        for (int64_t j = 0; j < k; j++) queue[j] = {row[j], j};
        std::make_heap(queue, queue + k, larger);
        for (int64_t j = k; j < n; j++) {
            Entry entry{row[j], j};
            if (larger(entry, queue[0])) {
                std::pop_heap(queue, queue + k, larger);
                queue[k - 1] = entry;
                std::push_heap(queue, queue + k, larger);
            }
        }
        std::sort_heap(queue, queue + k, larger);
        return;
    }
    for (int64_t j = 0; j < n; j++) queue[j] = {row[j], j};
    std::nth_element(queue, queue + k - 1, queue + n, larger);
    std::sort(queue, queue + k - 1, larger); /* aten sorts the k - 1 before the k-th */
}

}  // namespace

/* logits [n, num_experts] (fp32 or bf16, dtype code of cpu_common.h) -> ids [n, k] int64 and
 * weights [n, k] fp32. `scratch` has room for ROUTER_SCRATCH_BYTES(num_experts). */
extern "C" void route_softmax_topk(const void *logits, int dtype, int64_t n, int64_t num_experts, int64_t k,
                                   int renormalize, int64_t *ids, float *weights, void *scratch) {
    Entry *queue = static_cast<Entry *>(scratch);
    float *row = reinterpret_cast<float *>(queue + num_experts);
    for (int64_t t = 0; t < n; t++) {
        for (int64_t e = 0; e < num_experts; e++)
            row[e] = dtype == DT_BF16 ? bf16_to_f32(static_cast<const uint16_t *>(logits)[t * num_experts + e])
                                      : static_cast<const float *>(logits)[t * num_experts + e];
        top_k(row, num_experts, k, queue);
        float total = 0;
        if (renormalize) { /* torch.softmax of the k: their max taken out, then times one over the sum */
            float top = queue[0].first;
            for (int64_t j = 0; j < k; j++) total += expf(queue[j].first - top);
            float scale = 1.0f / total;
            for (int64_t j = 0; j < k; j++)
                ids[t * k + j] = queue[j].second, weights[t * k + j] = expf(queue[j].first - top) * scale;
            continue;
        }
        float most = *std::max_element(row, row + num_experts);
        if (std::isinf(most)) most = 0; /* torch.logsumexp: an infinite max is not taken out */
        for (int64_t e = 0; e < num_experts; e++) total += expf(row[e] - most);
        float log_total = logf(total) + most;
        for (int64_t j = 0; j < k; j++)
            ids[t * k + j] = queue[j].second, weights[t * k + j] = expf(queue[j].first - log_total);
    }
}
