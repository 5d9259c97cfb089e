// Package dsv3 is the Go binding of dsv3, a DeepSeek-V3 / R1 inference and training engine,
// over its C ABI (include/dsv3.h) with cgo.
//
// Handles (Model, Session, Tokenizer, Trainer, Grpo) wrap the C handles. Close frees one; it is
// idempotent, and a finalizer closes a handle that is garbage-collected unclosed, but close
// them yourself: a model holds its weights. Using a closed handle returns an error.
//
// A Model is immutable and safe for concurrent use (Generate from any number of goroutines).
// Sessions, Tokenizers, Trainers and Grpos serialize their calls with a mutex, so concurrent use
// is safe but not parallel. Sessions, trainers and tokenizers made from a Model keep what they
// need: the Model may be closed before them.
//
// Failures are *Error values carrying the C status and message; errors.Is(err, ErrIO) and the
// like test the status.
//
// Linking: see README.md. By default the package links target/release/libdsv3.so of the
// repository (rpath); -tags dsv3_static links libdsv3.a instead; CGO_LDFLAGS picks another
// build.
package dsv3

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#include <stdlib.h>
#include "helpers.h"
*/
import "C"

import (
	"runtime"
	"runtime/cgo"
	"strconv"
	"strings"
	"sync"
	"unsafe"
)

// HeaderABIVersion is the ABI version of the header this package was compiled against;
// ABIVersion() reports the library's.
const HeaderABIVersion = uint32(C.DSV3_ABI_VERSION)

// Version is the library's version string.
func Version() string { return C.GoString(C.dsv3_version()) }

// ABIVersion is the ABI version the linked library implements.
func ABIVersion() uint32 { return uint32(C.dsv3_abi_version()) }

// Status is a dsv3_status code. It implements error, so errors.Is(err, ErrIO) tests an *Error's
// code.
type Status int32

// The dsv3_status codes (numeric values are stable).
const (
	OK                 Status = C.DSV3_OK
	ErrNullArgument    Status = C.DSV3_ERR_NULL_ARGUMENT
	ErrInvalidArgument Status = C.DSV3_ERR_INVALID_ARGUMENT
	ErrIO              Status = C.DSV3_ERR_IO
	ErrConfig          Status = C.DSV3_ERR_CONFIG
	ErrWeights         Status = C.DSV3_ERR_WEIGHTS
	ErrNonFinite       Status = C.DSV3_ERR_NON_FINITE
	ErrUnsupported     Status = C.DSV3_ERR_UNSUPPORTED
	ErrCancelled       Status = C.DSV3_ERR_CANCELLED
	ErrBufferTooSmall  Status = C.DSV3_ERR_BUFFER_TOO_SMALL
	ErrInternal        Status = C.DSV3_ERR_INTERNAL
)

var statusNames = [...]string{
	"OK", "NULL_ARGUMENT", "INVALID_ARGUMENT", "IO", "CONFIG", "WEIGHTS", "NON_FINITE",
	"UNSUPPORTED", "CANCELLED", "BUFFER_TOO_SMALL", "INTERNAL",
}

func (s Status) String() string {
	if s >= 0 && int(s) < len(statusNames) {
		return statusNames[s]
	}
	return "STATUS(" + strconv.Itoa(int(s)) + ")"
}

func (s Status) Error() string { return "dsv3: " + s.String() }

// Error is a failed call: the status and the library's message (dsv3_last_error), which names
// the C function, e.g. "dsv3_model_load: /m/config.json: No such file or directory (os error 2)".
type Error struct {
	Code    Status
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "dsv3: " + e.Code.String()
	}
	return e.Message + " [" + e.Code.String() + "]"
}

// Is reports whether target is this error's Status (errors.Is(err, dsv3.ErrIO)).
func (e *Error) Is(target error) bool {
	s, ok := target.(Status)
	return ok && s == e.Code
}

// call runs one C call and turns a failure into an *Error. The OS thread is locked so that
// dsv3_last_error (thread-local) is read on the thread that failed.
func call(f func() C.enum_dsv3_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	st := f()
	if st == C.DSV3_OK {
		return nil
	}
	return &Error{Code: Status(st), Message: C.GoString(C.dsv3_last_error())}
}

func errorf(code Status, parts ...string) error {
	return &Error{Code: code, Message: strings.Join(parts, "")}
}

func closedError(what string) error {
	return errorf(ErrNullArgument, "dsv3: ", what, ": use of a closed handle")
}

// cstring is C.CString that refuses strings with NUL bytes (C would see them truncated).
func cstring(what, s string) (*C.char, error) {
	if strings.IndexByte(s, 0) >= 0 {
		return nil, errorf(ErrInvalidArgument, "dsv3: ", what, " contains a NUL byte")
	}
	return C.CString(s), nil
}

func i32ptr(s []int32) *C.int32_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.int32_t)(unsafe.Pointer(&s[0]))
}

// Device selects where a model runs.
type Device int32

const (
	CPU  Device = 0
	CUDA Device = 1 // the first GPU (CUDA + N is GPU N); Load fails with ErrUnsupported without a driver or GPU
)

// DType is the compute dtype on a GPU.
type DType int32

const (
	F32  DType = 0 // the CPU's; on a GPU it matches the CPU to ~1e-4
	BF16 DType = 1 // GPU only: bf16 weights and activations, FP8 checkpoints kept FP8
)

// Attention selects the MLA formulation (same results).
type Attention int32

const (
	AttentionAbsorbed Attention = 0
	AttentionNaive    Attention = 1
)

// ModelOptions are Load's options; the zero value (or nil) is the C defaults: CPU, FP8 weights
// kept as FP8, absorbed attention, no progress callback.
type ModelOptions struct {
	Device        Device
	DType         DType
	DequantizeFP8 bool // dequantize FP8 checkpoint weights to f32 at load
	Attention     Attention
	// Progress, if set, is called during loading with the fraction done in [0, 1]; returning
	// false cancels the load (Load then fails with ErrCancelled).
	Progress func(fraction float32) bool
}

// Model is a loaded model, immutable and safe for concurrent use.
type Model struct {
	mu  sync.RWMutex
	ptr *C.dsv3_model
}

func newModel(p *C.dsv3_model) *Model {
	m := &Model{ptr: p}
	runtime.SetFinalizer(m, func(m *Model) { m.Close() })
	return m
}

// Load loads the model in directory path (config.json + safetensors, HF layout; sharded or
// not; f32/bf16/f16/FP8). opts may be nil.
func Load(path string, opts *ModelOptions) (*Model, error) {
	cpath, err := cstring("path", path)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cpath))
	var p C.dsv3_model_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_model_params_default(&p) }); err != nil {
		return nil, err
	}
	var cb *callback
	if opts != nil {
		p.device = C.int32_t(opts.Device)
		p.dtype = C.int32_t(opts.DType)
		p.dequantize_fp8 = 0
		if opts.DequantizeFP8 {
			p.dequantize_fp8 = 1
		}
		p.attention = C.int32_t(opts.Attention)
		if opts.Progress != nil {
			cb = &callback{progress: opts.Progress}
			h := cgo.NewHandle(cb)
			defer h.Delete()
			C.dsv3go_set_progress(&p, C.uintptr_t(h))
		}
	}
	var out *C.dsv3_model
	err = call(func() C.enum_dsv3_status { return C.dsv3_model_load(cpath, &p, &out) })
	if cb != nil {
		if out != nil && cb.panicked {
			C.dsv3_model_free(out)
		}
		cb.repanic()
	}
	if err != nil {
		return nil, err
	}
	return newModel(out), nil
}

// Close frees the model (idempotent). Sessions, tokenizers and trainers made from it stay
// valid. It waits for running calls on the model to return.
func (m *Model) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ptr != nil {
		C.dsv3_model_free(m.ptr)
		m.ptr = nil
		runtime.SetFinalizer(m, nil)
	}
	return nil
}

// ModelInfo is what Info reports.
type ModelInfo struct {
	VocabSize         int
	HiddenSize        int
	NumLayers         int
	NumAttentionHeads int
	NumExperts        int // routed experts per MoE layer (0 for a dense model)
	ExpertsPerToken   int
	NumMTPModules     int // MTP modules loaded
	ParamsTotal       int64
	ParamsActive      int64 // parameters used per token
	// KVCacheBytesPerToken is the latent KV cache per token over all layers (f32 bytes).
	KVCacheBytesPerToken int64
	BOSTokenID           int32 // -1 if none
	EOSTokenID           int32 // the first EOS id, -1 if none
}

// Info reports the model's figures.
func (m *Model) Info() (ModelInfo, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return ModelInfo{}, closedError("Model.Info")
	}
	var i C.dsv3_model_info
	i.struct_size = C.size_t(unsafe.Sizeof(i))
	if err := call(func() C.enum_dsv3_status { return C.dsv3_model_get_info(m.ptr, &i) }); err != nil {
		return ModelInfo{}, err
	}
	return ModelInfo{
		VocabSize:            int(i.vocab_size),
		HiddenSize:           int(i.hidden_size),
		NumLayers:            int(i.num_layers),
		NumAttentionHeads:    int(i.num_attention_heads),
		NumExperts:           int(i.num_experts),
		ExpertsPerToken:      int(i.experts_per_token),
		NumMTPModules:        int(i.num_mtp_modules),
		ParamsTotal:          int64(i.params_total),
		ParamsActive:         int64(i.params_active),
		KVCacheBytesPerToken: int64(i.kv_cache_bytes_per_token),
		BOSTokenID:           int32(i.bos_token_id),
		EOSTokenID:           int32(i.eos_token_id),
	}, nil
}

// ConfigJSON returns the model's config as JSON.
func (m *Model) ConfigJSON() (string, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return "", closedError("Model.ConfigJSON")
	}
	buf := make([]byte, 4096)
	for {
		var needed C.size_t
		err := call(func() C.enum_dsv3_status {
			return C.dsv3_model_config_json(m.ptr, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)), &needed)
		})
		if e, ok := err.(*Error); ok && e.Code == ErrBufferTooSmall && int(needed) > len(buf) {
			buf = make([]byte, needed)
			continue
		}
		if err != nil {
			return "", err
		}
		return string(buf[:needed-1]), nil
	}
}

// SamplingParams are Generate's settings. Start from DefaultSamplingParams(): the zero value is
// not the default (TopP 0 is invalid).
type SamplingParams struct {
	Temperature  float32 // 0 = greedy
	TopK         uint32  // 0 = off
	TopP         float32 // 1 = off; in (0, 1]
	Seed         uint64
	MaxNewTokens uint32
	// StopTokens end generation; the stop token is included in the output.
	StopTokens []int32
}

// DefaultSamplingParams returns the C defaults: greedy, 64 new tokens, no stop tokens.
func DefaultSamplingParams() SamplingParams {
	var p C.dsv3_sampling_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_sampling_params_default(&p) }); err != nil {
		panic(err)
	}
	return SamplingParams{
		Temperature:  float32(p.temperature),
		TopK:         uint32(p.top_k),
		TopP:         float32(p.top_p),
		Seed:         uint64(p.seed),
		MaxNewTokens: uint32(p.max_new_tokens),
	}
}

// Generate continues prompt (at least one id) and returns the generated ids. onToken, if not
// nil, is called with each token as it is generated (on the calling goroutine); returning
// false stops generation (the ids so far, that token included, are returned with a nil error).
// onToken must not close m.
func (m *Model) Generate(prompt []int32, params SamplingParams, onToken func(token int32) bool) ([]int32, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return nil, closedError("Model.Generate")
	}
	var p C.dsv3_sampling_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_sampling_params_default(&p) }); err != nil {
		return nil, err
	}
	p.temperature = C.float(params.Temperature)
	p.top_k = C.uint32_t(params.TopK)
	p.top_p = C.float(params.TopP)
	p.seed = C.uint64_t(params.Seed)
	p.max_new_tokens = C.uint32_t(params.MaxNewTokens)
	var pin runtime.Pinner
	defer pin.Unpin()
	if n := len(params.StopTokens); n > 0 {
		pin.Pin(&params.StopTokens[0])
		p.stop_tokens = i32ptr(params.StopTokens)
		p.n_stop_tokens = C.size_t(n)
	}
	out := make([]int32, params.MaxNewTokens)
	var handle C.uintptr_t
	var cb *callback
	if onToken != nil {
		cb = &callback{token: onToken}
		h := cgo.NewHandle(cb)
		defer h.Delete()
		handle = C.uintptr_t(h)
	}
	var n C.size_t
	err := call(func() C.enum_dsv3_status {
		return C.dsv3go_generate(m.ptr, i32ptr(prompt), C.size_t(len(prompt)), &p, handle,
			i32ptr(out), C.size_t(len(out)), &n)
	})
	if cb != nil {
		cb.repanic()
	}
	if err != nil {
		return nil, err
	}
	return out[:n], nil
}
