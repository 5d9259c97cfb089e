package dsv3

// GRPO (group relative policy optimization, TRL's GRPOTrainer) over dsv3_grpo_*: a trainer that
// samples groups of completions for text prompts, scores them with built-in rule rewards and Go
// reward functions, and learns from the group-relative advantages.

/*
#include <stdlib.h>
#include "helpers.h"
*/
import "C"

import (
	"math"
	"runtime"
	"runtime/cgo"
	"strconv"
	"sync"
	"sync/atomic"
	"unsafe"
)

// LossType is how the GRPO loss is normalized (TRL's loss_type).
type LossType int32

const (
	LossGRPO   LossType = 0
	LossBNPO   LossType = 1
	LossDrGRPO LossType = 2
	LossDAPO   LossType = 3 // the default
)

// ScaleRewards is how advantages are scaled (TRL's scale_rewards).
type ScaleRewards int32

const (
	ScaleRewardsGroup ScaleRewards = 0 // by the std of the group's rewards (the default)
	ScaleRewardsBatch ScaleRewards = 1
	ScaleRewardsNone  ScaleRewards = 2
)

// GrpoParams are a GRPO trainer's settings (TRL's names). Start from DefaultGrpoParams(): the
// zero value is not the default (NumGenerations 0 and TopP 0 are invalid).
type GrpoParams struct {
	NumGenerations      uint32  // completions per prompt (G, >= 2)
	MaxCompletionLength uint32  // completion tokens at most
	Temperature         float32 // sampling temperature (> 0); the log-probs use the same
	TopP                float32 // in (0, 1]; 1 = off
	TopK                uint32  // 0 = off
	NumIterations       uint32  // μ: optimizer steps per generation batch
	Beta                float32 // KL weight β (0 = no reference model)
	Epsilon             float32
	EpsilonHigh         float32
	LossType            LossType
	ScaleRewards        ScaleRewards
	SequenceLevel       bool   // sequence-level importance ratio (GSPO)
	RefSyncSteps        uint64 // reset the reference to the policy every this many optimizer steps (0 = never)
	RefMixupAlpha       float32
	Seed                uint64 // seed of the sampling
}

// DefaultGrpoParams returns the C defaults (TRL's): G 8, 256 tokens, temperature 1, top-p 1,
// μ 1, β 0, ε 0.2 / 0.2, dapo, group scaling, token level, no reference reset.
func DefaultGrpoParams() GrpoParams {
	var p C.dsv3_grpo_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_params_default(&p) }); err != nil {
		panic(err)
	}
	return GrpoParams{
		NumGenerations:      uint32(p.num_generations),
		MaxCompletionLength: uint32(p.max_completion_length),
		Temperature:         float32(p.temperature),
		TopP:                float32(p.top_p),
		TopK:                uint32(p.top_k),
		NumIterations:       uint32(p.num_iterations),
		Beta:                float32(p.beta),
		Epsilon:             float32(p.epsilon),
		EpsilonHigh:         float32(p.epsilon_high),
		LossType:            LossType(p.loss_type),
		ScaleRewards:        ScaleRewards(p.scale_rewards),
		SequenceLevel:       p.sequence_level != 0,
		RefSyncSteps:        uint64(p.ref_sync_steps),
		RefMixupAlpha:       float32(p.ref_mixup_alpha),
		Seed:                uint64(p.seed),
	}
}

func (gp *GrpoParams) c() (C.dsv3_grpo_params, error) {
	var p C.dsv3_grpo_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_params_default(&p) }); err != nil {
		return p, err
	}
	p.num_generations = C.uint32_t(gp.NumGenerations)
	p.max_completion_length = C.uint32_t(gp.MaxCompletionLength)
	p.temperature = C.float(gp.Temperature)
	p.top_p = C.float(gp.TopP)
	p.top_k = C.uint32_t(gp.TopK)
	p.num_iterations = C.uint32_t(gp.NumIterations)
	p.beta = C.float(gp.Beta)
	p.epsilon = C.float(gp.Epsilon)
	p.epsilon_high = C.float(gp.EpsilonHigh)
	p.loss_type = C.int32_t(gp.LossType)
	p.scale_rewards = C.int32_t(gp.ScaleRewards)
	p.sequence_level = 0
	if gp.SequenceLevel {
		p.sequence_level = 1
	}
	p.ref_sync_steps = C.uint64_t(gp.RefSyncSteps)
	p.ref_mixup_alpha = C.float(gp.RefMixupAlpha)
	p.seed = C.uint64_t(gp.Seed)
	return p, nil
}

// RewardFunc is a Go reward: the prompt, the completion and the prompt's reference answer (nil
// when it has none) → the completion's reward, or NoReward() (NaN) when it does not apply
// (skipped in the weighted sum, as TRL's None). A non-nil error aborts the step before any
// optimizer step (Step returns a *RewardError wrapping it; the reward is not called again in that
// step). It runs on the goroutine calling Step and must not use the Grpo calling it.
type RewardFunc func(prompt, completion string, answer *string) (float32, error)

// NoReward is what a RewardFunc returns when its reward does not apply to a completion (NaN).
func NoReward() float32 { return float32(math.NaN()) }

// RewardError is Step's error when a reward function returned one; Unwrap gives that error.
type RewardError struct {
	Reward string // the reward's name
	Err    error
}

func (e *RewardError) Error() string {
	return "dsv3: reward " + strconv.Quote(e.Reward) + ": " + e.Err.Error()
}

func (e *RewardError) Unwrap() error { return e.Err }

// RewardStats are one reward function's mean and std over the last step's completions (NaN: it
// never applied).
type RewardStats struct {
	Name      string
	Mean, Std float32
}

// GrpoMetrics is what one GRPO step reports (TRL's metrics).
type GrpoMetrics struct {
	Step                 uint64  // the step's index (0-based)
	Loss                 float32 // averaged over the μ optimizer steps
	Reward               float32 // mean of the weighted reward over the batch
	RewardStd            float32
	FracRewardZeroStd    float32 // share of groups whose rewards are all equal (no learning signal)
	KL                   float32
	ClipRatioLow         float32
	ClipRatioHigh        float32
	ClipRatioRegion      float32
	CompletionLengthMean float32
	CompletionLengthMax  uint64
	ClippedRatio         float32 // share of completions cut at MaxCompletionLength
	GradNorm             float32
	LR                   float32
	CompletionTokens     uint64  // completion tokens sampled
	SamplingSeconds      float64 // generation + rewards
	LearningSeconds      float64 // the μ optimizer steps
	Rewards              []RewardStats
}

// Completion is a completion of the last step and its weighted reward (NaN when no reward
// function applied).
type Completion struct {
	Text   string
	Reward float32
}

// Grpo is a GRPO trainer: the policy (a copy of a model's weights), its optimizer, the
// reference model (β > 0), the reward functions and the last batch. Calls are serialized; a
// call from inside one of its own reward functions returns ErrInvalidArgument.
type Grpo struct {
	mu      sync.Mutex
	ptr     *C.dsv3_grpo
	gens    int
	state   *grpoState
	handles []cgo.Handle // the rewards' user data, deleted after the C trainer is freed
	rewards []string
	stepped bool // a step of this Grpo succeeded: there are completions
	// The OS thread running a step (its goroutine is locked to it), 0 when none: a call on
	// that thread comes from one of the step's reward functions.
	stepThread atomic.Uintptr
}

func newGrpo(p *C.dsv3_grpo, gens uint32) *Grpo {
	g := &Grpo{ptr: p, gens: int(gens), state: &grpoState{}}
	runtime.SetFinalizer(g, func(g *Grpo) { g.Close() })
	return g
}

// NewGrpo starts a GRPO trainer from m's weights (copied: m is unaffected). train sets the
// optimizer (LR, schedule, clipping; its Seed and BiasUpdateSpeed are ignored: sampling uses
// params.Seed and router biases stay fixed), params GRPO. Completions stop at the model's EOS
// (see SetStopTokens). Add a reward before Step.
func NewGrpo(m *Model, train TrainParams, params GrpoParams) (*Grpo, error) {
	tp, err := train.c()
	if err != nil {
		return nil, err
	}
	gp, err := params.c()
	if err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return nil, closedError("NewGrpo")
	}
	var out *C.dsv3_grpo
	if err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_new(m.ptr, &tp, &gp, &out) }); err != nil {
		return nil, err
	}
	return newGrpo(out, params.NumGenerations), nil
}

// LoadGrpo resumes a checkpoint written by Grpo.Save (the policy, its optimizer state and the
// step count). reference (may be nil: the loaded policy) is the frozen reference model for
// β > 0 (copied). Rewards are not saved: add them again.
func LoadGrpo(dir string, reference *Model, train TrainParams, params GrpoParams) (*Grpo, error) {
	tp, err := train.c()
	if err != nil {
		return nil, err
	}
	gp, err := params.c()
	if err != nil {
		return nil, err
	}
	cdir, err := cstring("dir", dir)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cdir))
	var ref *C.dsv3_model
	if reference != nil {
		reference.mu.RLock()
		defer reference.mu.RUnlock()
		if reference.ptr == nil {
			return nil, closedError("LoadGrpo: reference")
		}
		ref = reference.ptr
	}
	var out *C.dsv3_grpo
	if err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_load(cdir, ref, &tp, &gp, &out) }); err != nil {
		return nil, err
	}
	return newGrpo(out, params.NumGenerations), nil
}

// inReward reports whether the caller is one of g's reward functions (running on the OS thread
// of g's step). Another goroutine cannot be on that thread while the step runs.
func (g *Grpo) inReward() bool {
	if g.stepThread.Load() == 0 {
		return false
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	t := g.stepThread.Load()
	return t != 0 && t == uintptr(C.dsv3go_thread())
}

func reentryError(what string) error {
	return errorf(ErrInvalidArgument, "dsv3: Grpo.", what, ": a reward function cannot use the Grpo that is calling it")
}

// lock takes g's mutex for a call (the caller unlocks it), or fails for a closed Grpo or a call
// from inside one of g's reward functions (which would wait for itself).
func (g *Grpo) lock(what string) error {
	if g.inReward() {
		return reentryError(what)
	}
	g.mu.Lock()
	if g.ptr == nil {
		g.mu.Unlock()
		return closedError("Grpo." + what)
	}
	return nil
}

// Close frees the trainer and its reward functions' handles (idempotent). It fails only when
// called from one of its own reward functions.
func (g *Grpo) Close() error {
	if g.inReward() {
		return reentryError("Close")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ptr != nil {
		C.dsv3_grpo_free(g.ptr)
		g.ptr = nil
		for _, h := range g.handles {
			h.Delete()
		}
		g.handles = nil
		runtime.SetFinalizer(g, nil)
	}
	return nil
}

// NumGenerations is the number of completions per prompt (G).
func (g *Grpo) NumGenerations() int { return g.gens }

// Rewards returns the names of the reward functions, in the order added.
func (g *Grpo) Rewards() []string {
	if g.inReward() {
		// the step holds the mutex for this very goroutine; the rewards cannot change meanwhile
		return append([]string(nil), g.rewards...)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.rewards...)
}

// AddReward adds a reward with weight (a completion's reward is the weighted sum). With fn nil,
// name picks a built-in rule reward: "accuracy" (\boxed{} / <answer> vs the reference answer),
// "exact" (the completion's first line vs the reference), "format" (R1's
// <think>…</think><answer>…</answer>), "language" (English reasoning), "language-zh". With fn,
// Go computes it once per completion and name labels its stats. Names are unique.
func (g *Grpo) AddReward(name string, weight float32, fn RewardFunc) error {
	cname, err := cstring("reward name", name)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cname))
	if err := g.lock("AddReward"); err != nil {
		return err
	}
	defer g.mu.Unlock()
	var h cgo.Handle
	if fn != nil {
		h = cgo.NewHandle(&rewardCallback{name: name, fn: fn, state: g.state})
	}
	err = call(func() C.enum_dsv3_status {
		return C.dsv3go_grpo_add_reward(g.ptr, cname, C.float(weight), C.uintptr_t(h))
	})
	if err != nil {
		if h != 0 {
			h.Delete()
		}
		return err
	}
	if h != 0 {
		g.handles = append(g.handles, h)
	}
	g.rewards = append(g.rewards, name)
	return nil
}

// SetStopTokens makes completions end after any of these token ids (replacing the default, the
// model's EOS; none: only MaxCompletionLength ends them).
func (g *Grpo) SetStopTokens(tokens []uint32) error {
	if err := g.lock("SetStopTokens"); err != nil {
		return err
	}
	defer g.mu.Unlock()
	var p *C.uint32_t
	if len(tokens) > 0 {
		p = (*C.uint32_t)(unsafe.Pointer(&tokens[0]))
	}
	return call(func() C.enum_dsv3_status { return C.dsv3_grpo_set_stop_tokens(g.ptr, p, C.size_t(len(tokens))) })
}

// Step runs one GRPO step: samples NumGenerations completions of each prompt, scores them with
// the rewards, and takes μ optimizer steps. answers is nil or has one entry per prompt (nil: no
// reference answer). tok encodes the prompts and decodes the completions; nil for a byte-level
// model. A reward function's error comes back as a *RewardError (no optimizer step was taken),
// a panic in one is re-raised here; on any failure the weights are unchanged (unless
// NumIterations > 1 and an optimizer step already ran).
func (g *Grpo) Step(prompts []string, answers []*string, tok *Tokenizer) (GrpoMetrics, error) {
	if answers != nil && len(answers) != len(prompts) {
		return GrpoMetrics{}, errorf(ErrInvalidArgument, "dsv3: Grpo.Step: ", strconv.Itoa(len(answers)),
			" answers for ", strconv.Itoa(len(prompts)), " prompts")
	}
	var owned []*C.char
	defer func() {
		for _, p := range owned {
			C.free(unsafe.Pointer(p))
		}
	}()
	// arrays of C pointers (no Go pointers in them, so C may read them from Go memory)
	cps := make([]*C.char, len(prompts))
	for i, p := range prompts {
		c, err := cstring("prompts["+strconv.Itoa(i)+"]", p)
		if err != nil {
			return GrpoMetrics{}, err
		}
		owned = append(owned, c)
		cps[i] = c
	}
	var cas []*C.char
	if answers != nil {
		cas = make([]*C.char, len(answers))
		for i, a := range answers {
			if a == nil {
				continue
			}
			c, err := cstring("answers["+strconv.Itoa(i)+"]", *a)
			if err != nil {
				return GrpoMetrics{}, err
			}
			owned = append(owned, c)
			cas[i] = c
		}
	}
	var pp, ap **C.char
	if len(cps) > 0 {
		pp = &cps[0]
	}
	if len(cas) > 0 {
		ap = &cas[0]
	}
	if err := g.lock("Step"); err != nil {
		return GrpoMetrics{}, err
	}
	defer g.mu.Unlock()
	var ctok *C.dsv3_tokenizer
	if tok != nil {
		tok.mu.Lock()
		defer tok.mu.Unlock()
		if tok.ptr == nil {
			return GrpoMetrics{}, closedError("Grpo.Step: tokenizer")
		}
		ctok = tok.ptr
	}
	var m C.dsv3_grpo_metrics
	m.struct_size = C.size_t(unsafe.Sizeof(m))
	*g.state = grpoState{}
	runtime.LockOSThread()
	g.stepThread.Store(uintptr(C.dsv3go_thread()))
	err := call(func() C.enum_dsv3_status {
		return C.dsv3_grpo_step(g.ptr, ctok, pp, ap, C.size_t(len(prompts)), &m)
	})
	g.stepThread.Store(0)
	runtime.UnlockOSThread()
	st := *g.state
	*g.state = grpoState{}
	if st.panicked {
		panic(st.panicVal)
	}
	if st.err != nil {
		return GrpoMetrics{}, &RewardError{Reward: st.reward, Err: st.err}
	}
	if err != nil {
		return GrpoMetrics{}, err
	}
	g.stepped = true
	stats := make([]RewardStats, len(g.rewards))
	for i := range g.rewards {
		if stats[i], err = g.rewardStats(i); err != nil {
			return GrpoMetrics{}, err
		}
	}
	return GrpoMetrics{
		Step:                 uint64(m.step),
		Loss:                 float32(m.loss),
		Reward:               float32(m.reward),
		RewardStd:            float32(m.reward_std),
		FracRewardZeroStd:    float32(m.frac_reward_zero_std),
		KL:                   float32(m.kl),
		ClipRatioLow:         float32(m.clip_ratio_low),
		ClipRatioHigh:        float32(m.clip_ratio_high),
		ClipRatioRegion:      float32(m.clip_ratio_region),
		CompletionLengthMean: float32(m.completion_length_mean),
		CompletionLengthMax:  uint64(m.completion_length_max),
		ClippedRatio:         float32(m.clipped_ratio),
		GradNorm:             float32(m.grad_norm),
		LR:                   float32(m.lr),
		CompletionTokens:     uint64(m.completion_tokens),
		SamplingSeconds:      float64(m.sampling_s),
		LearningSeconds:      float64(m.learning_s),
		Rewards:              stats,
	}, nil
}

func (g *Grpo) rewardStats(index int) (RewardStats, error) {
	var mean, std C.float
	err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_reward_stats(g.ptr, C.size_t(index), &mean, &std) })
	if err != nil {
		return RewardStats{}, err
	}
	name := ""
	if index < len(g.rewards) {
		name = g.rewards[index]
	}
	return RewardStats{Name: name, Mean: float32(mean), Std: float32(std)}, nil
}

// RewardStats returns the mean and std of reward function index (in the order added) over the
// last step's completions (NaN: it never applied). It fails before the first step.
func (g *Grpo) RewardStats(index int) (RewardStats, error) {
	if index < 0 {
		return RewardStats{}, errorf(ErrInvalidArgument, "dsv3: Grpo.RewardStats: negative index ", strconv.Itoa(index))
	}
	if err := g.lock("RewardStats"); err != nil {
		return RewardStats{}, err
	}
	defer g.mu.Unlock()
	return g.rewardStats(index)
}

// NumCompletions is the number of completions of the last step (prompts × NumGenerations). It
// fails (ErrInvalidArgument) before the first step.
func (g *Grpo) NumCompletions() (int, error) {
	if err := g.lock("NumCompletions"); err != nil {
		return 0, err
	}
	defer g.mu.Unlock()
	return g.numCompletions()
}

func (g *Grpo) numCompletions() (int, error) {
	var n C.size_t
	if err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_num_completions(g.ptr, &n) }); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Completion returns completion i of the last step (prompt i / NumGenerations, sample
// i % NumGenerations).
func (g *Grpo) Completion(i int) (Completion, error) {
	if i < 0 {
		return Completion{}, errorf(ErrInvalidArgument, "dsv3: Grpo.Completion: negative index ", strconv.Itoa(i))
	}
	if err := g.lock("Completion"); err != nil {
		return Completion{}, err
	}
	defer g.mu.Unlock()
	return g.completion(i)
}

func (g *Grpo) completion(i int) (Completion, error) {
	buf := make([]byte, 256)
	for {
		var needed C.size_t
		var reward C.float
		err := call(func() C.enum_dsv3_status {
			return C.dsv3_grpo_completion(g.ptr, C.size_t(i), (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)), &needed, &reward)
		})
		if isTooSmall(err) && int(needed) > len(buf) {
			buf = make([]byte, needed)
			continue
		}
		if err != nil {
			return Completion{}, err
		}
		// needed counts the NUL; the text may itself hold NULs (a byte tokenizer's 0)
		return Completion{Text: string(buf[:needed-1]), Reward: float32(reward)}, nil
	}
}

// Completions returns the last step's completions, prompt by prompt (completion i is prompt
// i / NumGenerations); none before the first step.
func (g *Grpo) Completions() ([]Completion, error) {
	if err := g.lock("Completions"); err != nil {
		return nil, err
	}
	defer g.mu.Unlock()
	if !g.stepped {
		return nil, nil
	}
	n, err := g.numCompletions()
	if err != nil {
		return nil, err
	}
	out := make([]Completion, n)
	for i := range out {
		if out[i], err = g.completion(i); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Model returns a model with the policy's current weights (a snapshot, for inference).
func (g *Grpo) Model() (*Model, error) {
	if err := g.lock("Model"); err != nil {
		return nil, err
	}
	defer g.mu.Unlock()
	var out *C.dsv3_model
	if err := call(func() C.enum_dsv3_status { return C.dsv3_grpo_model(g.ptr, &out) }); err != nil {
		return nil, err
	}
	return newModel(out), nil
}

// Save writes the policy as a checkpoint directory (HF-format model + optimizer + state),
// atomically; LoadGrpo resumes it with its step count, LoadTrainer as a plain trainer.
func (g *Grpo) Save(dir string) error {
	cdir, err := cstring("dir", dir)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cdir))
	if err := g.lock("Save"); err != nil {
		return err
	}
	defer g.mu.Unlock()
	return call(func() C.enum_dsv3_status { return C.dsv3_grpo_save(g.ptr, cdir) })
}
