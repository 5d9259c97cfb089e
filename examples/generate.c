/* generate MODEL_DIR "prompt text" [max_new_tokens]: loads a model, encodes the prompt with the
 * model's tokenizer and streams a sampled continuation (temperature 0.7, top-p 0.95, seed 0)
 * until the model's EOS or max_new_tokens (default 64). See examples/README.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dsv3.h"

#define MAX_TOKENS 4096

typedef struct {
    const dsv3_tokenizer *tok;
    int32_t ids[MAX_TOKENS];
    size_t n, printed, cap; /* ids so far; bytes of their text printed; size of text */
    char *text;
} stream;

static int32_t on_progress(void *user_data, float fraction) {
    (void)user_data;
    fprintf(stderr, "\rloading %3d%%%s", (int)(fraction * 100.0f + 0.5f), fraction >= 1.0f ? "\n" : "");
    return 0;
}

/* Decodes all the ids so far and prints what is new: a single token may be part of a UTF-8
 * character (decoded as U+FFFD until the character is complete), the running text is not. */
static int32_t on_token(void *user_data, int32_t token) {
    stream *s = user_data;
    size_t len = 0;
    dsv3_status st;
    s->ids[s->n++] = token;
    while ((st = dsv3_tokenizer_decode(s->tok, s->ids, s->n, 1, s->text, s->cap, &len)) == DSV3_ERR_BUFFER_TOO_SMALL) {
        char *bigger = realloc(s->text, len); /* len: the size needed, NUL included */
        if (!bigger) return 1;
        s->text = bigger;
        s->cap = len;
    }
    if (st != DSV3_OK) return 1;
    if (len >= 4 && memcmp(s->text + len - 4, "\xEF\xBF\xBD", 3) == 0) return 0; /* wait for the rest */
    if (len - 1 > s->printed) {
        fputs(s->text + s->printed, stdout);
        fflush(stdout);
        s->printed = len - 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    static stream s;
    static int32_t prompt[MAX_TOKENS];
    dsv3_model_params mp;
    dsv3_sampling_params sp;
    dsv3_model_info info;
    dsv3_model *model = NULL;
    dsv3_tokenizer *tok = NULL;
    int32_t eos = -1, out[MAX_TOKENS];
    size_t n_prompt = 0, n_out = 0;
    int max_new = argc > 3 ? atoi(argv[3]) : 64, ok = 0;

    if (argc < 3 || max_new < 0 || max_new > MAX_TOKENS) {
        fprintf(stderr, "usage: %s MODEL_DIR \"prompt text\" [max_new_tokens <= %d]\n", argv[0], MAX_TOKENS);
        return 2;
    }
    dsv3_model_params_default(&mp);
    mp.progress = on_progress;
    dsv3_sampling_params_default(&sp);
    sp.temperature = 0.7f;
    sp.top_p = 0.95f;
    sp.seed = 0;
    sp.max_new_tokens = (uint32_t)max_new;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;

    if (dsv3_model_load(argv[1], &mp, &model) == DSV3_OK && dsv3_model_get_info(model, &info) == DSV3_OK &&
        dsv3_tokenizer_for_model(model, &tok) == DSV3_OK &&
        dsv3_tokenizer_encode(tok, argv[2], 1, prompt, MAX_TOKENS, &n_prompt) == DSV3_OK) {
        eos = (int32_t)info.eos_token_id;
        sp.stop_tokens = &eos;
        sp.n_stop_tokens = eos >= 0 ? 1 : 0;
        s.tok = tok;
        fputs(argv[2], stdout);
        ok = dsv3_generate(model, prompt, n_prompt, &sp, on_token, &s, out, MAX_TOKENS, &n_out) == DSV3_OK;
        printf("\n");
        if (ok) fprintf(stderr, "[%zu tokens%s]\n", n_out, n_out && out[n_out - 1] == eos ? ", EOS" : "");
    }
    if (!ok) fprintf(stderr, "error: %s\n", dsv3_last_error());
    free(s.text);
    dsv3_tokenizer_free(tok);
    dsv3_model_free(model);
    return ok ? 0 : 1;
}
