// C glue between the Go package and the C ABI: installs the exported Go trampolines as the
// callbacks and carries a runtime/cgo.Handle (an integer) as their user_data, so Go never has to
// turn an integer into an unsafe.Pointer.
#include "helpers.h"

#include <pthread.h>

#include "_cgo_export.h"

void dsv3go_set_progress(dsv3_model_params *params, uintptr_t handle) {
    params->progress = dsv3goProgress;
    params->user_data = (void *)handle;
}

enum dsv3_status dsv3go_generate(const dsv3_model *model, const int32_t *prompt, size_t n_prompt,
                            const dsv3_sampling_params *params, uintptr_t handle, int32_t *out,
                            size_t cap, size_t *n_out) {
    return dsv3_generate(model, prompt, n_prompt, params, handle ? dsv3goToken : NULL,
                         (void *)handle, out, cap, n_out);
}

// dsv3_reward_fn's strings are const; cgo exports the Go trampoline with plain char *.
static float dsv3go_reward(void *user_data, const char *prompt, const char *completion,
                           const char *answer) {
    return dsv3goReward(user_data, (char *)prompt, (char *)completion, (char *)answer);
}

enum dsv3_status dsv3go_grpo_add_reward(dsv3_grpo *grpo, const char *name, float weight,
                                        uintptr_t handle) {
    return dsv3_grpo_add_reward(grpo, name, weight, handle ? dsv3go_reward : NULL, (void *)handle);
}

uintptr_t dsv3go_thread(void) {
    return (uintptr_t)pthread_self();
}
