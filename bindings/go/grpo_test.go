package dsv3_test

// GRPO on the byte-level "tiny" preset (no tokenizer needed): Go reward functions called
// prompts × G times (NoReward when there is no reference answer), the reward rising over 40
// steps (as ffi/tests/abi.rs grpo_with_host_and_builtin_rewards), a reward's error aborting the
// step and leaving the trainer usable, panics, re-entry refused, parameters and errors, stop
// tokens, completions, checkpoint and resume.

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	dsv3 "github.com/dsv3/dsv3/bindings/go"
)

// tinyModel is a fresh "tiny" preset model (byte-level: 259 ids).
func tinyModel(t *testing.T) *dsv3.Model {
	t.Helper()
	tr, err := dsv3.NewTrainerFromPreset("tiny", dsv3.DefaultTrainParams())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	m, err := tr.Model()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func grpoTrainParams() dsv3.TrainParams {
	tp := dsv3.DefaultTrainParams()
	tp.Schedule = dsv3.ScheduleConstant
	tp.LR = 1e-3
	return tp
}

func grpoParams() dsv3.GrpoParams {
	p := dsv3.DefaultGrpoParams()
	p.NumGenerations = 4
	p.MaxCompletionLength = 5
	p.Beta = 0.04
	return p
}

func newGrpo(t *testing.T, m *dsv3.Model) *dsv3.Grpo {
	t.Helper()
	g, err := dsv3.NewGrpo(m, grpoTrainParams(), grpoParams())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

func str(s string) *string { return &s }

var (
	grpoPrompts = []string{"ab", "cd", "no answer"}
	grpoAnswers = []*string{str("x"), str("y"), nil}
)

// lowercaseShare is the share of lowercase ASCII letters among the completion's characters.
func lowercaseShare(completion string) float32 {
	n, lower := 0, 0
	for _, r := range completion {
		n++
		if r >= 'a' && r <= 'z' {
			lower++
		}
	}
	if n == 0 {
		n = 1
	}
	return float32(lower) / float32(n)
}

func TestGrpoParamsAndErrors(t *testing.T) {
	d := dsv3.DefaultGrpoParams()
	if d.NumGenerations != 8 || d.MaxCompletionLength != 256 || d.Temperature != 1 || d.TopP != 1 ||
		d.NumIterations != 1 || d.Beta != 0 || d.LossType != dsv3.LossDAPO || d.ScaleRewards != dsv3.ScaleRewardsGroup ||
		d.SequenceLevel {
		t.Fatalf("defaults: %+v", d)
	}
	m := tinyModel(t)
	bad := grpoParams()
	bad.NumGenerations = 1
	if _, err := dsv3.NewGrpo(m, grpoTrainParams(), bad); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("G = 1: %v", err)
	}
	bad = grpoParams()
	bad.LossType = 9
	var de *dsv3.Error
	if _, err := dsv3.NewGrpo(m, grpoTrainParams(), bad); !errors.As(err, &de) || !strings.Contains(de.Message, "loss_type") {
		t.Fatalf("loss type 9: %v", err)
	}

	g := newGrpo(t, m)
	if g.NumGenerations() != 4 {
		t.Fatalf("NumGenerations %d", g.NumGenerations())
	}
	if _, err := g.Step(grpoPrompts, grpoAnswers, nil); !errors.Is(err, dsv3.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "reward") {
		t.Fatalf("step without a reward: %v", err)
	}
	if err := g.AddReward("bogus", 1, nil); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("unknown built-in: %v", err)
	}
	if err := g.AddReward("exact", 0.5, nil); err != nil {
		t.Fatal(err)
	}
	if err := g.AddReward("exact", 1, nil); !errors.Is(err, dsv3.ErrInvalidArgument) ||
		!strings.Contains(err.Error(), "already") {
		t.Fatalf("duplicate name: %v", err)
	}
	fn := func(string, string, *string) (float32, error) { return 1, nil }
	if err := g.AddReward("inf weight", float32(math.Inf(1)), fn); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("infinite weight: %v", err)
	}
	if r := g.Rewards(); len(r) != 1 || r[0] != "exact" {
		t.Fatalf("rewards %v", r)
	}
	// before the first step there is nothing to read
	if c, err := g.Completions(); c != nil || err != nil {
		t.Fatalf("completions before a step: %v, %v", c, err)
	}
	if _, err := g.NumCompletions(); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("NumCompletions before a step: %v", err)
	}
	if _, err := g.RewardStats(0); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("RewardStats before a step: %v", err)
	}
	// what Go checks before C reads the arrays
	if _, err := g.Step(grpoPrompts, grpoAnswers[:1], nil); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("answers for 1 of 3 prompts: %v", err)
	}
	if _, err := g.Step([]string{"a\x00b"}, nil, nil); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("NUL in a prompt: %v", err)
	}
	if _, err := g.Step(nil, nil, nil); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("no prompts: %v", err)
	}
	// the fixture model (99 ids) is not byte-level: it needs a tokenizer
	fixture := loadModel(t, readExpected(t))
	other, err := dsv3.NewGrpo(fixture, grpoTrainParams(), grpoParams())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.AddReward("exact", 1, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Step([]string{"ab"}, nil, nil); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("no tokenizer for a 99-id model: %v", err)
	}
	// closing twice; use after close
	other.Close()
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Step([]string{"ab"}, nil, nil); !errors.Is(err, dsv3.ErrNullArgument) {
		t.Fatalf("closed Grpo: %v", err)
	}
}

func TestGrpoRewardRises(t *testing.T) {
	g := newGrpo(t, tinyModel(t))
	calls, withoutAnswer := 0, 0
	err := g.AddReward("lower", 1, func(prompt, completion string, answer *string) (float32, error) {
		calls++
		if prompt == "" {
			t.Error("empty prompt")
		}
		if answer == nil {
			withoutAnswer++
			return dsv3.NoReward(), nil
		}
		return lowercaseShare(completion), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.AddReward("exact", 0.5, nil); err != nil {
		t.Fatal(err)
	}
	var rewards []float32
	var last dsv3.GrpoMetrics
	start := time.Now()
	for i := 0; i < 40; i++ {
		m, err := g.Step(grpoPrompts, grpoAnswers, nil)
		if err != nil {
			t.Fatal(err)
		}
		if m.Step != uint64(i) {
			t.Fatalf("step %d reported as %d", i, m.Step)
		}
		rewards = append(rewards, m.Reward)
		last = m
	}
	t.Logf("40 GRPO steps in %v; rewards %v", time.Since(start), rewards)
	if calls != 40*len(grpoPrompts)*4 || withoutAnswer != 40*4 {
		t.Fatalf("reward called %d times (%d without an answer), want %d (%d)", calls, withoutAnswer,
			40*len(grpoPrompts)*4, 40*4)
	}
	if last.CompletionLengthMax > 5 || !(last.SamplingSeconds > 0) || !(last.LearningSeconds > 0) {
		t.Fatalf("metrics %+v", last)
	}
	if !(last.KL > 0) {
		t.Fatalf("β > 0: the policy should have moved away from the reference, KL %v", last.KL)
	}
	var first, tail float32
	for i := 0; i < 8; i++ {
		first += rewards[i] / 8
		tail += rewards[32+i] / 8
	}
	if !(tail > first+0.1) {
		t.Fatalf("the reward does not rise: first 8 steps %.3f, last 8 %.3f: %v", first, tail, rewards)
	}

	// per-reward stats, in the metrics and on demand
	if len(last.Rewards) != 2 || last.Rewards[0].Name != "lower" || last.Rewards[1].Name != "exact" {
		t.Fatalf("reward stats %+v", last.Rewards)
	}
	lower, err := g.RewardStats(0)
	if err != nil || lower != last.Rewards[0] || !(lower.Mean > 0 && lower.Mean <= 1) {
		t.Fatalf("RewardStats(0): %+v, %v", lower, err)
	}
	if _, err := g.RewardStats(2); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("RewardStats(2): %v", err)
	}

	// 12 completions; the third prompt's have no applicable reward (NaN)
	if n, err := g.NumCompletions(); err != nil || n != 12 {
		t.Fatalf("NumCompletions: %d, %v", n, err)
	}
	cs, err := g.Completions()
	if err != nil || len(cs) != 12 {
		t.Fatalf("completions: %d, %v", len(cs), err)
	}
	if math.IsNaN(float64(cs[0].Reward)) || !math.IsNaN(float64(cs[11].Reward)) {
		t.Fatalf("completion rewards: %+v", cs)
	}
	if c, err := g.Completion(3); err != nil || c.Text != cs[3].Text {
		t.Fatalf("Completion(3): %+v, %v", c, err)
	}
	if _, err := g.Completion(12); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("Completion(12): %v", err)
	}
}

func TestGrpoRewardErrorAbortsStep(t *testing.T) {
	g := newGrpo(t, tinyModel(t))
	scorerDown := errors.New("scorer unavailable")
	calls, failAt := 0, 0
	err := g.AddReward("lower", 1, func(_, completion string, _ *string) (float32, error) {
		calls++
		if calls == failAt {
			return 0, scorerDown
		}
		return lowercaseShare(completion), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := g.Step(grpoPrompts, grpoAnswers, nil); err != nil || m.Step != 0 {
		t.Fatalf("first step: %+v, %v", m, err)
	}
	before, _ := g.Completions()

	// an error from the reward: the step fails before any optimizer step
	failAt = calls + 3
	_, err = g.Step(grpoPrompts, grpoAnswers, nil)
	var re *dsv3.RewardError
	if !errors.Is(err, scorerDown) || !errors.As(err, &re) || re.Reward != "lower" {
		t.Fatalf("failing reward: %v", err)
	}
	t.Logf("failed step: %v", err)
	if calls != failAt {
		t.Fatalf("the reward was called %d times after its error", calls-failAt)
	}
	// the trainer is as it was: same last batch, the failed step not counted, still usable
	if after, _ := g.Completions(); len(after) != len(before) || after[0] != before[0] {
		t.Fatal("the failed step replaced the last batch")
	}
	failAt = 0
	if m, err := g.Step(grpoPrompts, grpoAnswers, nil); err != nil || m.Step != 1 {
		t.Fatalf("step after the failure: %+v, %v", m, err)
	}

	// a panic in a reward comes back to the caller, not through the library
	panicking := true
	if err := g.AddReward("panics", 1, func(string, string, *string) (float32, error) {
		if panicking {
			panic("boom")
		}
		return 0, nil
	}); err != nil {
		t.Fatal(err)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Fatalf("recovered %v", r)
			}
		}()
		g.Step(grpoPrompts, grpoAnswers, nil)
		t.Fatal("no panic")
	}()
	panicking = false
	if m, err := g.Step(grpoPrompts, grpoAnswers, nil); err != nil || m.Step != 2 {
		t.Fatalf("step after the panic: %+v, %v", m, err)
	}

	// a non-finite reward fails the step with ErrNonFinite
	if err := g.AddReward("infinite", 1, func(string, string, *string) (float32, error) {
		return float32(math.Inf(1)), nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Step(grpoPrompts, grpoAnswers, nil); !errors.Is(err, dsv3.ErrNonFinite) {
		t.Fatalf("infinite reward: %v", err)
	}
}

func TestGrpoReentryRefused(t *testing.T) {
	g := newGrpo(t, tinyModel(t))
	var inside []error
	var wg sync.WaitGroup
	var fromOther error
	var otherN int
	first := true
	err := g.AddReward("reentrant", 1, func(_, completion string, _ *string) (float32, error) {
		if first {
			first = false
			// the reward's own calls into g are refused (they would wait for themselves)
			inside = append(inside, g.Save(t.TempDir()), g.Close())
			_, e := g.NumCompletions()
			inside = append(inside, e)
			if r := g.Rewards(); len(r) != 1 {
				inside = append(inside, errors.New("Rewards() from a reward: "+strings.Join(r, ",")))
			}
			// another goroutine's call is not refused: it waits for the step
			wg.Add(1)
			go func() {
				defer wg.Done()
				otherN, fromOther = g.NumCompletions()
			}()
			time.Sleep(50 * time.Millisecond)
		}
		return lowercaseShare(completion), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Step(grpoPrompts, grpoAnswers, nil); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if len(inside) != 3 {
		t.Fatalf("calls from inside the reward: %v", inside)
	}
	for _, e := range inside {
		if !errors.Is(e, dsv3.ErrInvalidArgument) || !strings.Contains(e.Error(), "reward function") {
			t.Fatalf("a call from inside the reward: %v", e)
		}
	}
	if fromOther != nil || otherN != 12 {
		t.Fatalf("another goroutine during the step: %d, %v", otherN, fromOther)
	}
}

func TestGrpoStopTokensAndCheckpoint(t *testing.T) {
	m := tinyModel(t)
	g := newGrpo(t, m)
	if err := g.AddReward("lower", 1, func(_, c string, _ *string) (float32, error) { return lowercaseShare(c), nil }); err != nil {
		t.Fatal(err)
	}
	if err := g.SetStopTokens([]uint32{10}); err != nil {
		t.Fatal(err)
	}
	if err := g.SetStopTokens([]uint32{100000}); !errors.Is(err, dsv3.ErrInvalidArgument) {
		t.Fatalf("stop token outside the vocabulary: %v", err)
	}
	// no stop tokens: every completion runs to MaxCompletionLength
	if err := g.SetStopTokens(nil); err != nil {
		t.Fatal(err)
	}
	var last dsv3.GrpoMetrics
	for i := 0; i < 2; i++ {
		var err error
		if last, err = g.Step(grpoPrompts, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if last.CompletionLengthMean != 5 || last.CompletionLengthMax != 5 || last.CompletionTokens != 12*5 {
		t.Fatalf("without stop tokens: %+v", last)
	}

	// the policy as a model
	snap, err := g.Model()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	if info, err := snap.Info(); err != nil || info.VocabSize != 259 {
		t.Fatalf("snapshot: %+v, %v", info, err)
	}
	sp := dsv3.DefaultSamplingParams()
	sp.MaxNewTokens = 4
	if out, err := snap.Generate([]int32{97, 98}, sp, nil); err != nil || len(out) != 4 {
		t.Fatalf("snapshot generate: %v, %v", out, err)
	}

	// save; resume with the step count (rewards are added again); as a plain trainer too
	dir := filepath.Join(t.TempDir(), "grpo-ckpt")
	if err := g.Save(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "model.safetensors")); err != nil {
		t.Fatal(err)
	}
	g2, err := dsv3.LoadGrpo(dir, m, grpoTrainParams(), grpoParams())
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	if len(g2.Rewards()) != 0 {
		t.Fatalf("rewards after load: %v", g2.Rewards())
	}
	if err := g2.AddReward("exact", 1, nil); err != nil {
		t.Fatal(err)
	}
	if m2, err := g2.Step(grpoPrompts, grpoAnswers, nil); err != nil || m2.Step != 2 {
		t.Fatalf("resumed step: %+v, %v", m2, err)
	}
	g3, err := dsv3.LoadGrpo(dir, nil, grpoTrainParams(), grpoParams())
	if err != nil {
		t.Fatal(err)
	}
	g3.Close()
	tr, err := dsv3.LoadTrainer(dir, grpoTrainParams())
	if err != nil {
		t.Fatal(err)
	}
	tr.Close()
	if _, err := dsv3.LoadGrpo(filepath.Join(t.TempDir(), "missing"), nil, grpoTrainParams(), grpoParams()); err == nil {
		t.Fatal("loaded a missing checkpoint")
	} else {
		t.Logf("missing checkpoint: %v", err)
	}
}
