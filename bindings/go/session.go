package dsv3

/*
#include "dsv3.h"
*/
import "C"

import (
	"runtime"
	"strconv"
	"sync"
	"unsafe"
)

// Session is an inference session over a fixed number of sequence slots, each with its own
// latent KV cache. Calls are serialized.
type Session struct {
	mu    sync.Mutex
	ptr   *C.dsv3_session
	vocab int
}

// NewSession creates a session with slots empty sequences on m (which may be closed
// afterwards).
func NewSession(m *Model, slots int) (*Session, error) {
	info, err := m.Info()
	if err != nil {
		return nil, err
	}
	if slots <= 0 {
		return nil, errorf(ErrInvalidArgument, "dsv3: NewSession: slots must be positive, got ", strconv.Itoa(slots))
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return nil, closedError("NewSession")
	}
	var out *C.dsv3_session
	if err := call(func() C.enum_dsv3_status { return C.dsv3_session_new(m.ptr, C.size_t(slots), &out) }); err != nil {
		return nil, err
	}
	s := &Session{ptr: out, vocab: info.VocabSize}
	runtime.SetFinalizer(s, func(s *Session) { s.Close() })
	return s, nil
}

// Close frees the session (idempotent).
func (s *Session) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ptr != nil {
		C.dsv3_session_free(s.ptr)
		s.ptr = nil
		runtime.SetFinalizer(s, nil)
	}
	return nil
}

// Step appends ids to slot (a prefill when there are several, a decode step for one) and
// returns the logits of the last token (vocabulary-size floats). On failure the slot's cache is
// unchanged.
func (s *Session) Step(slot int, ids []int32) ([]float32, error) {
	logits := make([]float32, s.vocab)
	if err := s.StepInto(slot, ids, logits); err != nil {
		return nil, err
	}
	return logits, nil
}

// StepInto is Step writing the logits into dst (at least the vocabulary size), or computing
// none when dst is nil.
func (s *Session) StepInto(slot int, ids []int32, dst []float32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ptr == nil {
		return closedError("Session.Step")
	}
	if slot < 0 {
		return errorf(ErrInvalidArgument, "dsv3: Session.Step: negative slot ", strconv.Itoa(slot))
	}
	var lp *C.float
	if len(dst) > 0 {
		lp = (*C.float)(unsafe.Pointer(&dst[0]))
	} else if dst != nil {
		return errorf(ErrBufferTooSmall, "dsv3: Session.StepInto: dst is empty (nil computes no logits)")
	}
	return call(func() C.enum_dsv3_status {
		return C.dsv3_session_step(s.ptr, C.size_t(slot), i32ptr(ids), C.size_t(len(ids)), lp, C.size_t(len(dst)), nil)
	})
}

// Length returns the number of tokens cached in slot.
func (s *Session) Length(slot int) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ptr == nil {
		return 0, closedError("Session.Length")
	}
	if slot < 0 {
		return 0, errorf(ErrInvalidArgument, "dsv3: Session.Length: negative slot ", strconv.Itoa(slot))
	}
	var n C.size_t
	err := call(func() C.enum_dsv3_status { return C.dsv3_session_length(s.ptr, C.size_t(slot), &n) })
	return int(n), err
}

// Reset empties slot.
func (s *Session) Reset(slot int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ptr == nil {
		return closedError("Session.Reset")
	}
	if slot < 0 {
		return errorf(ErrInvalidArgument, "dsv3: Session.Reset: negative slot ", strconv.Itoa(slot))
	}
	return call(func() C.enum_dsv3_status { return C.dsv3_session_reset(s.ptr, C.size_t(slot)) })
}

// Truncate keeps the first length tokens of slot.
func (s *Session) Truncate(slot, length int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ptr == nil {
		return closedError("Session.Truncate")
	}
	if slot < 0 || length < 0 {
		return errorf(ErrInvalidArgument, "dsv3: Session.Truncate: negative slot or length")
	}
	return call(func() C.enum_dsv3_status {
		return C.dsv3_session_truncate(s.ptr, C.size_t(slot), C.size_t(length))
	})
}
