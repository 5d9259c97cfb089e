// C glue between the Go package and the C ABI: installs the exported Go trampolines as the
// callbacks and carries a runtime/cgo.Handle (an integer) as their user_data, so Go never has to
// turn an integer into an unsafe.Pointer.
#include "helpers.h"

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
