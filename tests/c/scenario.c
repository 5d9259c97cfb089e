/* The binding scenario in C: load the tiny fixture model, greedy-generate 8 tokens and compare
 * with the Rust API's ids (bindings/testdata/expected.json, mirrored below), run 3 training steps
 * on a fixed batch and compare the losses, and load a missing path. Run from the repository root. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsv3.h"

#define CHECK(call)                                                                   \
    do {                                                                              \
        dsv3_status s_ = (call);                                                      \
        if (s_ != DSV3_OK) {                                                          \
            fprintf(stderr, "%s failed (%d): %s\n", #call, (int)s_, dsv3_last_error()); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static int count_tokens(void *user_data, int32_t token) {
    (void)token;
    ++*(int *)user_data;
    return 0;
}

static int read_expected(int32_t *ids, float *losses) {
    FILE *f = fopen("bindings/testdata/expected.json", "r");
    char buf[8192];
    size_t n;
    const char *p;
    int i;
    if (!f) return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    p = strstr(buf, "\"generated\"");
    if (!p) return 0;
    p = strchr(p, '[');
    for (i = 0; i < 8; i++) ids[i] = (int32_t)strtol(p + 1, (char **)&p, 10);
    p = strstr(buf, "\"losses\"");
    if (!p) return 0;
    p = strchr(p, '[');
    for (i = 0; i < 3; i++) losses[i] = strtof(p + 1, (char **)&p);
    return 1;
}

int main(void) {
    int32_t want_ids[8];
    float want_losses[3];
    dsv3_model *model = NULL;
    dsv3_model_params mp;
    dsv3_sampling_params sp;
    dsv3_train_params tp;
    dsv3_trainer *trainer = NULL;
    dsv3_session *session = NULL;
    dsv3_model_info info;
    const int32_t prompt[3] = {1, 2, 3};
    const int32_t batch[16] = {5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23, 24, 25, 26, 27};
    int32_t out[8];
    size_t n_out = 0, needed = 0;
    float *logits;
    int streamed = 0, i;
    dsv3_model *missing = NULL;

    if (!read_expected(want_ids, want_losses)) {
        fprintf(stderr, "cannot read bindings/testdata/expected.json\n");
        return 1;
    }
    printf("dsv3 %s, ABI %u\n", dsv3_version(), dsv3_abi_version());
    if (dsv3_abi_version() != DSV3_ABI_VERSION) return 1;

    CHECK(dsv3_model_params_default(&mp));
    CHECK(dsv3_model_load("tests/fixtures/v3_tiny", &mp, &model));
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK(dsv3_model_get_info(model, &info));

    /* greedy generation: the Rust API's ids */
    CHECK(dsv3_sampling_params_default(&sp));
    sp.max_new_tokens = 8;
    CHECK(dsv3_generate(model, prompt, 3, &sp, count_tokens, &streamed, out, 8, &n_out));
    if (n_out != 8 || streamed != 8) return 1;
    for (i = 0; i < 8; i++) {
        if (out[i] != want_ids[i]) {
            fprintf(stderr, "token %d: %d, Rust gave %d\n", i, out[i], want_ids[i]);
            return 1;
        }
    }
    /* the same through a session: prefill, then decode with argmax */
    CHECK(dsv3_session_new(model, 1, &session));
    logits = malloc(sizeof(float) * info.vocab_size);
    CHECK(dsv3_session_step(session, 0, prompt, 3, logits, info.vocab_size, &needed));
    if (needed != info.vocab_size) return 1;
    for (i = 0; i < 8; i++) {
        int32_t best = 0;
        size_t v;
        for (v = 1; v < info.vocab_size; v++)
            if (logits[v] > logits[best]) best = (int32_t)v;
        if (best != want_ids[i]) return 1;
        CHECK(dsv3_session_step(session, 0, &best, 1, logits, info.vocab_size, NULL));
    }
    free(logits);
    dsv3_session_free(session);

    /* three training steps: the Rust API's losses, decreasing */
    CHECK(dsv3_train_params_default(&tp));
    tp.schedule = 0;
    tp.lr = 5e-3f;
    CHECK(dsv3_trainer_new(model, &tp, &trainer));
    for (i = 0; i < 3; i++) {
        dsv3_step_metrics m;
        memset(&m, 0, sizeof m);
        m.struct_size = sizeof m;
        CHECK(dsv3_trainer_step(trainer, batch, 2, 8, &m));
        if (fabsf(m.loss - want_losses[i]) > 1e-5f * want_losses[i]) {
            fprintf(stderr, "step %d loss %.9g, Rust gave %.9g\n", i, m.loss, want_losses[i]);
            return 1;
        }
    }
    dsv3_trainer_free(trainer);
    dsv3_model_free(model);

    /* a missing model: an error status and a message naming the file */
    if (dsv3_model_load("/nonexistent/dsv3-model", NULL, &missing) != DSV3_ERR_IO || missing != NULL) return 1;
    if (!strstr(dsv3_last_error(), "/nonexistent/dsv3-model/config.json")) return 1;
    /* misuse is reported, not crashed on */
    if (dsv3_model_load(NULL, NULL, &missing) != DSV3_ERR_NULL_ARGUMENT) return 1;
    dsv3_model_free(NULL);
    printf("C scenario: ok\n");
    return 0;
}
