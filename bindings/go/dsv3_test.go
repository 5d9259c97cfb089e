package dsv3_test

// The binding scenario (as tests/c/scenario.c): load the tiny fixture model, greedy-generate 8
// tokens and compare with the Rust API's ids (bindings/testdata/expected.json), the same through
// a session, 3 training steps on a fixed batch compared with the Rust losses, and a missing
// model. Run from this directory (go test does): paths are relative to it.

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	dsv3 "github.com/dsv3/dsv3/bindings/go"
)

type expected struct {
	Model        string  `json:"model"`
	Prompt       []int32 `json:"prompt"`
	MaxNewTokens uint32  `json:"max_new_tokens"`
	Generated    []int32 `json:"generated"`
	Train        struct {
		Batch    [][]int32 `json:"batch"`
		LR       float32   `json:"lr"`
		Schedule int32     `json:"schedule"`
		Steps    int       `json:"steps"`
		Losses   []float64 `json:"losses"`
	} `json:"train"`
	MissingModel         string  `json:"missing_model"`
	MissingErrorContains string  `json:"missing_model_error_contains"`
	LossRelTolerance     float64 `json:"loss_rel_tolerance"`
}

const root = "../.."

func readExpected(t *testing.T) *expected {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "bindings/testdata/expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var e expected
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatal(err)
	}
	if len(e.Generated) == 0 || len(e.Train.Losses) == 0 {
		t.Fatal("expected.json lacks generated ids or losses")
	}
	return &e
}

func loadModel(t *testing.T, e *expected) *dsv3.Model {
	t.Helper()
	m, err := dsv3.Load(filepath.Join(root, e.Model), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestVersion(t *testing.T) {
	if dsv3.ABIVersion() != dsv3.HeaderABIVersion {
		t.Fatalf("library ABI %d, header ABI %d", dsv3.ABIVersion(), dsv3.HeaderABIVersion)
	}
	if dsv3.Version() == "" {
		t.Fatal("empty version")
	}
	t.Logf("dsv3 %s, ABI %d", dsv3.Version(), dsv3.ABIVersion())
}

func TestGenerate(t *testing.T) {
	e := readExpected(t)
	var fractions []float32
	m, err := dsv3.Load(filepath.Join(root, e.Model), &dsv3.ModelOptions{
		Progress: func(f float32) bool { fractions = append(fractions, f); return true },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if len(fractions) == 0 || fractions[len(fractions)-1] != 1 {
		t.Fatalf("progress: %v, want it to end at 1", fractions)
	}
	p := dsv3.DefaultSamplingParams()
	if p.Temperature != 0 || p.TopP != 1 || p.MaxNewTokens != 64 {
		t.Fatalf("defaults: %+v", p)
	}
	p.MaxNewTokens = e.MaxNewTokens
	var streamed []int32
	ids, err := m.Generate(e.Prompt, p, func(tok int32) bool { streamed = append(streamed, tok); return true })
	if err != nil {
		t.Fatal(err)
	}
	if !equal(ids, e.Generated) || !equal(streamed, e.Generated) {
		t.Fatalf("generated %v, streamed %v; Rust gave %v", ids, streamed, e.Generated)
	}
	// no callback
	ids, err = m.Generate(e.Prompt, p, nil)
	if err != nil || !equal(ids, e.Generated) {
		t.Fatalf("without a callback: %v, %v", ids, err)
	}
}

func TestConcurrentGenerate(t *testing.T) {
	e := readExpected(t)
	m := loadModel(t, e)
	p := dsv3.DefaultSamplingParams()
	p.MaxNewTokens = e.MaxNewTokens
	var wg sync.WaitGroup
	errs := make([]error, 4)
	outs := make([][]int32, 4)
	for i := range outs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs[i], errs[i] = m.Generate(e.Prompt, p, nil)
		}(i)
	}
	wg.Wait()
	for i := range outs {
		if errs[i] != nil || !equal(outs[i], e.Generated) {
			t.Fatalf("goroutine %d: %v, %v", i, outs[i], errs[i])
		}
	}
}

func TestSessionArgmax(t *testing.T) {
	e := readExpected(t)
	m := loadModel(t, e)
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	s, err := dsv3.NewSession(m, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	logits, err := s.Step(0, e.Prompt)
	if err != nil {
		t.Fatal(err)
	}
	if len(logits) != info.VocabSize {
		t.Fatalf("%d logits, vocabulary %d", len(logits), info.VocabSize)
	}
	for i, want := range e.Generated {
		best := argmax(logits)
		if best != want {
			t.Fatalf("token %d: argmax %d, Rust gave %d", i, best, want)
		}
		if logits, err = s.Step(0, []int32{best}); err != nil {
			t.Fatal(err)
		}
	}
	n, err := s.Length(0)
	if err != nil || n != len(e.Prompt)+len(e.Generated) {
		t.Fatalf("length %d, %v", n, err)
	}
	if err := s.Truncate(0, len(e.Prompt)); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Length(0); n != len(e.Prompt) {
		t.Fatalf("length after truncate %d", n)
	}
	if err := s.Reset(0); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Length(0); n != 0 {
		t.Fatalf("length after reset %d", n)
	}
	// errors from the library: a bad slot, an out-of-vocabulary id
	if _, err := s.Step(1, e.Prompt); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("slot 1: %v", err)
	}
	if _, err := s.Step(0, []int32{int32(info.VocabSize)}); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("id = vocab size: %v", err)
	}
}

func TestTrain(t *testing.T) {
	e := readExpected(t)
	m := loadModel(t, e)
	p := dsv3.DefaultTrainParams()
	p.Schedule = dsv3.Schedule(e.Train.Schedule)
	p.LR = e.Train.LR
	tr, err := dsv3.NewTrainer(m, p)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	var ids []int32
	for _, row := range e.Train.Batch {
		ids = append(ids, row...)
	}
	batch, seqLen := len(e.Train.Batch), len(e.Train.Batch[0])
	var losses []float64
	for i := 0; i < e.Train.Steps; i++ {
		sm, err := tr.Step(ids, batch, seqLen)
		if err != nil {
			t.Fatal(err)
		}
		if sm.Step != uint64(i) || sm.Tokens == 0 {
			t.Fatalf("metrics %+v", sm)
		}
		want := e.Train.Losses[i]
		if math.Abs(float64(sm.Loss)-want) > e.LossRelTolerance*want {
			t.Fatalf("step %d loss %.9g, Rust gave %.9g", i, sm.Loss, want)
		}
		losses = append(losses, float64(sm.Loss))
	}
	if !(losses[len(losses)-1] < losses[0]) {
		t.Fatalf("losses do not decrease: %v", losses)
	}
	loads, err := tr.ExpertLoad(0)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := m.Info()
	if len(loads) != info.NumExperts {
		t.Fatalf("expert loads %v for %d experts", loads, info.NumExperts)
	}
	// a shape mismatch is caught before the library reads out of bounds
	if _, err := tr.Step(ids, batch, seqLen+1); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("short ids: %v", err)
	}
	// SFT: prompt positions masked out
	mask := make([]float32, batch*(seqLen-1))
	for i := range mask {
		if i%(seqLen-1) >= 3 {
			mask[i] = 1
		}
	}
	if _, err := tr.StepSFT(ids, mask, batch, seqLen); err != nil {
		t.Fatal(err)
	}
	// checkpoint round trip; the snapshot model generates
	dir := t.TempDir()
	if err := tr.Save(filepath.Join(dir, "ckpt")); err != nil {
		t.Fatal(err)
	}
	tr2, err := dsv3.LoadTrainer(filepath.Join(dir, "ckpt"), p)
	if err != nil {
		t.Fatal(err)
	}
	defer tr2.Close()
	snap, err := tr2.Model()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	sp := dsv3.DefaultSamplingParams()
	sp.MaxNewTokens = 4
	if out, err := snap.Generate(e.Prompt, sp, nil); err != nil || len(out) != 4 {
		t.Fatalf("snapshot generate: %v, %v", out, err)
	}
}

func TestPreset(t *testing.T) {
	p := dsv3.DefaultTrainParams()
	p.Seed = 7
	tr, err := dsv3.NewTrainerFromPreset("tiny", p)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if _, err := dsv3.NewTrainerFromPreset("no-such-preset", p); err == nil {
		t.Fatal("unknown preset accepted")
	}
	p.Schedule = 9
	var e *dsv3.Error
	if _, err := dsv3.NewTrainerFromPreset("tiny", p); !errors.As(err, &e) || e.Code != dsv3.ErrInvalidArgument ||
		!strings.Contains(e.Message, "schedule") {
		t.Fatalf("bad schedule: %v", err)
	}
}

func TestMissingModel(t *testing.T) {
	e := readExpected(t)
	m, err := dsv3.Load(e.MissingModel, nil)
	if m != nil {
		t.Fatal("got a model")
	}
	t.Logf("Load(%q): %v", e.MissingModel, err)
	var de *dsv3.Error
	if !errors.As(err, &de) {
		t.Fatalf("error %T %v, want *dsv3.Error", err, err)
	}
	if de.Code != dsv3.ErrIO || !errors.Is(err, dsv3.ErrIO) {
		t.Fatalf("code %v, want IO", de.Code)
	}
	if !strings.Contains(de.Message, e.MissingErrorContains) || !strings.Contains(err.Error(), e.MissingErrorContains) {
		t.Fatalf("message %q lacks %q", de.Message, e.MissingErrorContains)
	}
	if _, err := dsv3.Load("a\x00b", nil); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("NUL in path: %v", err)
	}
	if _, err := dsv3.Load(filepath.Join(root, e.Model), &dsv3.ModelOptions{Device: dsv3.CUDA}); !errors.Is(err, dsv3.ErrUnsupported) {
		t.Fatalf("CUDA: %v", err)
	}
}

func TestCloseTwiceAndUseAfterClose(t *testing.T) {
	e := readExpected(t)
	m, err := dsv3.Load(filepath.Join(root, e.Model), nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := dsv3.NewSession(m, 2)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := dsv3.NewTrainer(m, dsv3.DefaultTrainParams())
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	m.Close()
	// the session and trainer hold their own reference to the weights
	if _, err := s.Step(0, e.Prompt); err != nil {
		t.Fatal(err)
	}
	for _, c := range []interface{ Close() error }{s, s, tr, tr} {
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Generate(e.Prompt, dsv3.DefaultSamplingParams(), nil); !errors.Is(err, dsv3.ErrNullArgument) {
		t.Fatalf("closed model: %v", err)
	}
	if _, err := s.Step(0, e.Prompt); err == nil {
		t.Fatal("closed session stepped")
	}
	if _, err := tr.Step([]int32{1, 2}, 1, 2); err == nil {
		t.Fatal("closed trainer stepped")
	}
}

func TestStopEarly(t *testing.T) {
	e := readExpected(t)
	m := loadModel(t, e)
	p := dsv3.DefaultSamplingParams()
	p.MaxNewTokens = e.MaxNewTokens
	calls := 0
	ids, err := m.Generate(e.Prompt, p, func(int32) bool { calls++; return calls < 3 })
	if err != nil {
		t.Fatal(err)
	}
	if calls != 3 || !equal(ids, e.Generated[:3]) {
		t.Fatalf("stopped after %d calls with %v", calls, ids)
	}
	// a stop token ends generation too (and is included)
	p.StopTokens = []int32{e.Generated[1]}
	if ids, err = m.Generate(e.Prompt, p, nil); err != nil || !equal(ids, e.Generated[:2]) {
		t.Fatalf("stop token: %v, %v", ids, err)
	}
	// a progress callback cancels a load
	_, err = dsv3.Load(filepath.Join(root, e.Model), &dsv3.ModelOptions{Progress: func(float32) bool { return false }})
	if !errors.Is(err, dsv3.ErrCancelled) {
		t.Fatalf("cancelled load: %v", err)
	}
	// a panic in a callback comes back to the caller, not through the library
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Fatalf("recovered %v", r)
			}
		}()
		m.Generate(e.Prompt, p, func(int32) bool { panic("boom") })
		t.Fatal("no panic")
	}()
}

func TestTokenizer(t *testing.T) {
	tok, err := dsv3.LoadTokenizer(filepath.Join(root, "tests/fixtures/tokenizer/tokenizer.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	text := "Hello, DeepSeek-V3! ünïcödé"
	ids, err := tok.Encode(text, false)
	if err != nil || len(ids) == 0 {
		t.Fatalf("encode: %v, %v", ids, err)
	}
	back, err := tok.Decode(ids, true)
	if err != nil || back != text {
		t.Fatalf("decode: %q, %v", back, err)
	}
	long := strings.Repeat("ab ", 2000)
	if ids, err := tok.Encode(long, true); err != nil || len(ids) == 0 {
		t.Fatalf("long encode: %v", err)
	} else if back, err := tok.Decode(ids, true); err != nil || back != long {
		t.Fatalf("long decode: %v", err)
	}
	if n, err := tok.VocabSize(); err != nil || n <= 0 {
		t.Fatalf("vocab size %d, %v", n, err)
	}
	if _, err := tok.TokenToID("<no such token>"); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("unknown token: %v", err)
	}
	tok.Close()
	tok.Close()

	// the tiny fixture model has no tokenizer.json and a 300-id vocabulary: no tokenizer
	e := readExpected(t)
	m := loadModel(t, e)
	if _, err := dsv3.TokenizerForModel(m); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("TokenizerForModel: %v", err)
	}
}

func argmax(x []float32) int32 {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return int32(best)
}

func equal(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
