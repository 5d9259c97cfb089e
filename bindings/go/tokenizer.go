package dsv3

/*
#include <stdlib.h>
#include "dsv3.h"
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// Tokenizer is a HF tokenizer.json tokenizer or the built-in byte tokenizer. Calls are
// serialized.
type Tokenizer struct {
	mu  sync.Mutex
	ptr *C.dsv3_tokenizer
}

func newTokenizer(p *C.dsv3_tokenizer) *Tokenizer {
	t := &Tokenizer{ptr: p}
	runtime.SetFinalizer(t, func(t *Tokenizer) { t.Close() })
	return t
}

// LoadTokenizer loads a HF tokenizer.json.
func LoadTokenizer(path string) (*Tokenizer, error) {
	cpath, err := cstring("path", path)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cpath))
	var out *C.dsv3_tokenizer
	if err := call(func() C.enum_dsv3_status { return C.dsv3_tokenizer_load(cpath, &out) }); err != nil {
		return nil, err
	}
	return newTokenizer(out), nil
}

// TokenizerForModel returns the tokenizer of m's directory: its tokenizer.json, or the built-in
// byte tokenizer for a byte-level vocabulary (259 ids).
func TokenizerForModel(m *Model) (*Tokenizer, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return nil, closedError("TokenizerForModel")
	}
	var out *C.dsv3_tokenizer
	if err := call(func() C.enum_dsv3_status { return C.dsv3_tokenizer_for_model(m.ptr, &out) }); err != nil {
		return nil, err
	}
	return newTokenizer(out), nil
}

// Close frees the tokenizer (idempotent).
func (t *Tokenizer) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr != nil {
		C.dsv3_tokenizer_free(t.ptr)
		t.ptr = nil
		runtime.SetFinalizer(t, nil)
	}
	return nil
}

func isTooSmall(err error) bool {
	e, ok := err.(*Error)
	return ok && e.Code == ErrBufferTooSmall
}

// Encode tokenizes UTF-8 text (which must not contain NUL bytes); addSpecial adds the
// tokenizer's special tokens (e.g. BOS).
func (t *Tokenizer) Encode(text string, addSpecial bool) ([]int32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return nil, closedError("Tokenizer.Encode")
	}
	ctext, err := cstring("text", text)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(ctext))
	special := C.int32_t(0)
	if addSpecial {
		special = 1
	}
	// one call in the usual case: a token covers at least one byte
	ids := make([]int32, len(text)+16)
	for {
		var needed C.size_t
		err := call(func() C.enum_dsv3_status {
			return C.dsv3_tokenizer_encode(t.ptr, ctext, special, i32ptr(ids), C.size_t(len(ids)), &needed)
		})
		if isTooSmall(err) && int(needed) > len(ids) {
			ids = make([]int32, needed)
			continue
		}
		if err != nil {
			return nil, err
		}
		if int(needed) < len(ids)/2 { // do not keep a mostly unused buffer alive
			return append([]int32(nil), ids[:needed]...), nil
		}
		return ids[:needed:needed], nil
	}
}

// Decode turns ids into text; skipSpecial drops special tokens.
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return "", closedError("Tokenizer.Decode")
	}
	skip := C.int32_t(0)
	if skipSpecial {
		skip = 1
	}
	buf := make([]byte, 8*len(ids)+64)
	for {
		var needed C.size_t
		err := call(func() C.enum_dsv3_status {
			return C.dsv3_tokenizer_decode(t.ptr, i32ptr(ids), C.size_t(len(ids)), skip,
				(*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)), &needed)
		})
		if isTooSmall(err) && int(needed) > len(buf) {
			buf = make([]byte, needed)
			continue
		}
		if err != nil {
			return "", err
		}
		return string(buf[:needed-1]), nil
	}
}

// TokenToID returns the id of a token string (e.g. "<｜end▁of▁sentence｜>"); ErrInvalidArgument
// if the vocabulary has none.
func (t *Tokenizer) TokenToID(token string) (int32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return 0, closedError("Tokenizer.TokenToID")
	}
	ctok, err := cstring("token", token)
	if err != nil {
		return 0, err
	}
	defer C.free(unsafe.Pointer(ctok))
	var id C.int32_t
	if err := call(func() C.enum_dsv3_status { return C.dsv3_tokenizer_token_to_id(t.ptr, ctok, &id) }); err != nil {
		return 0, err
	}
	return int32(id), nil
}

// VocabSize returns the vocabulary size, added tokens included.
func (t *Tokenizer) VocabSize() (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return 0, closedError("Tokenizer.VocabSize")
	}
	var n C.size_t
	if err := call(func() C.enum_dsv3_status { return C.dsv3_tokenizer_vocab_size(t.ptr, &n) }); err != nil {
		return 0, err
	}
	return int(n), nil
}
