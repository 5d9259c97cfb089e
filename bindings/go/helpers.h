#ifndef DSV3GO_HELPERS_H
#define DSV3GO_HELPERS_H

#include <stdint.h>

#include "dsv3.h"

// Sets params->progress to the Go trampoline and params->user_data to `handle`.
void dsv3go_set_progress(dsv3_model_params *params, uintptr_t handle);

// dsv3_generate with the Go token trampoline as the callback when `handle` is not 0.
enum dsv3_status dsv3go_generate(const dsv3_model *model, const int32_t *prompt, size_t n_prompt,
                            const dsv3_sampling_params *params, uintptr_t handle, int32_t *out,
                            size_t cap, size_t *n_out);

// dsv3_grpo_add_reward with the Go reward trampoline as the callback when `handle` is not 0 (a
// built-in reward, chosen by `name`, when it is 0).
enum dsv3_status dsv3go_grpo_add_reward(dsv3_grpo *grpo, const char *name, float weight,
                                        uintptr_t handle);

// The calling OS thread (pthread_self), to tell a reward function's call into its own Grpo from
// another goroutine's.
uintptr_t dsv3go_thread(void);

#endif
