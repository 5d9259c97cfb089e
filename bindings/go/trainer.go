package dsv3

/*
#include <stdlib.h>
#include "dsv3.h"
*/
import "C"

import (
	"runtime"
	"strconv"
	"sync"
	"unsafe"
)

// Schedule is a learning-rate schedule.
type Schedule int32

const (
	ScheduleConstant     Schedule = 0 // LR throughout
	ScheduleWarmupCosine Schedule = 1 // linear warmup, then cosine to MinLR over TotalSteps
	ScheduleDeepSeekV3   Schedule = 2 // DeepSeek-V3's step schedule
)

// Precision is the GEMM precision of the decoder's linear layers in training.
type Precision int32

const (
	PrecisionF32  Precision = 0
	PrecisionBF16 Precision = 1
	PrecisionFP8  Precision = 2
)

// TrainParams are a trainer's settings. Start from DefaultTrainParams().
type TrainParams struct {
	LR              float32
	MinLR           float32 // final learning rate of the cosine schedule
	WarmupSteps     uint64
	TotalSteps      uint64 // steps the schedule spans (cosine and DeepSeek-V3)
	Schedule        Schedule
	WeightDecay     float32
	ClipNorm        float32 // global gradient-norm clip; 0 = off
	BiasUpdateSpeed float32 // auxiliary-loss-free bias update speed γ; 0 = off
	SeqAuxAlpha     float32 // complementary sequence-wise balance loss α
	AuxLossAlpha    float32 // conventional auxiliary balance loss weight; 0 = off
	MTPLambda       float32 // MTP loss weight (models with MTP modules)
	Precision       Precision
	BF16Moments     bool   // keep AdamW moments in bf16
	Seed            uint64 // seed of the random initialization (NewTrainerFromPreset)
}

// DefaultTrainParams returns the C defaults: lr 1e-3, 20 warmup steps + cosine over 1000 steps
// to 1e-4, AdamW weight decay 0.1, clip 1.0, bias update 0.001, sequence-wise α 1e-4, MTP λ 0.3,
// f32.
func DefaultTrainParams() TrainParams {
	var p C.dsv3_train_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_train_params_default(&p) }); err != nil {
		panic(err)
	}
	return TrainParams{
		LR:              float32(p.lr),
		MinLR:           float32(p.min_lr),
		WarmupSteps:     uint64(p.warmup_steps),
		TotalSteps:      uint64(p.total_steps),
		Schedule:        Schedule(p.schedule),
		WeightDecay:     float32(p.weight_decay),
		ClipNorm:        float32(p.clip_norm),
		BiasUpdateSpeed: float32(p.bias_update_speed),
		SeqAuxAlpha:     float32(p.seq_aux_alpha),
		AuxLossAlpha:    float32(p.aux_loss_alpha),
		MTPLambda:       float32(p.mtp_lambda),
		Precision:       Precision(p.precision),
		BF16Moments:     p.bf16_moments != 0,
		Seed:            uint64(p.seed),
	}
}

func (tp *TrainParams) c() (C.dsv3_train_params, error) {
	var p C.dsv3_train_params
	if err := call(func() C.enum_dsv3_status { return C.dsv3_train_params_default(&p) }); err != nil {
		return p, err
	}
	p.lr = C.float(tp.LR)
	p.min_lr = C.float(tp.MinLR)
	p.warmup_steps = C.uint64_t(tp.WarmupSteps)
	p.total_steps = C.uint64_t(tp.TotalSteps)
	p.schedule = C.int32_t(tp.Schedule)
	p.weight_decay = C.float(tp.WeightDecay)
	p.clip_norm = C.float(tp.ClipNorm)
	p.bias_update_speed = C.float(tp.BiasUpdateSpeed)
	p.seq_aux_alpha = C.float(tp.SeqAuxAlpha)
	p.aux_loss_alpha = C.float(tp.AuxLossAlpha)
	p.mtp_lambda = C.float(tp.MTPLambda)
	p.precision = C.int32_t(tp.Precision)
	p.bf16_moments = 0
	if tp.BF16Moments {
		p.bf16_moments = 1
	}
	p.seed = C.uint64_t(tp.Seed)
	return p, nil
}

// StepMetrics is what one training step reports.
type StepMetrics struct {
	Step            uint64  // the step's index (0-based)
	Loss            float32 // mean next-token cross-entropy over the counted positions
	BalanceLoss     float32
	MTPLoss         float32
	GradNorm        float32 // global gradient norm before clipping
	LR              float32
	Tokens          uint64
	TokensPerSec    float64
	MaxOverMeanLoad float32 // largest max/mean expert load over the MoE layers; 1 = balanced
}

// Trainer holds f32 master weights, gradients and AdamW state. Calls are serialized.
type Trainer struct {
	mu  sync.Mutex
	ptr *C.dsv3_trainer
}

func newTrainer(p *C.dsv3_trainer) *Trainer {
	t := &Trainer{ptr: p}
	runtime.SetFinalizer(t, func(t *Trainer) { t.Close() })
	return t
}

// NewTrainer starts training from m's weights (copied: m is unaffected).
func NewTrainer(m *Model, params TrainParams) (*Trainer, error) {
	p, err := params.c()
	if err != nil {
		return nil, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return nil, closedError("NewTrainer")
	}
	var out *C.dsv3_trainer
	if err := call(func() C.enum_dsv3_status { return C.dsv3_trainer_new(m.ptr, &p, &out) }); err != nil {
		return nil, err
	}
	return newTrainer(out), nil
}

// NewTrainerFromPreset starts from a fresh, randomly initialized model of a preset ("tiny",
// "bench-4m", "bench-88m"), seeded with params.Seed.
func NewTrainerFromPreset(name string, params TrainParams) (*Trainer, error) {
	p, err := params.c()
	if err != nil {
		return nil, err
	}
	cname, err := cstring("preset", name)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cname))
	var out *C.dsv3_trainer
	if err := call(func() C.enum_dsv3_status { return C.dsv3_trainer_new_preset(cname, &p, &out) }); err != nil {
		return nil, err
	}
	return newTrainer(out), nil
}

// LoadTrainer resumes a checkpoint written by Save (or `dsv3 train`) with params.
func LoadTrainer(dir string, params TrainParams) (*Trainer, error) {
	p, err := params.c()
	if err != nil {
		return nil, err
	}
	cdir, err := cstring("dir", dir)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cdir))
	var out *C.dsv3_trainer
	if err := call(func() C.enum_dsv3_status { return C.dsv3_trainer_load(cdir, &p, &out) }); err != nil {
		return nil, err
	}
	return newTrainer(out), nil
}

// Close frees the trainer (idempotent).
func (t *Trainer) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr != nil {
		C.dsv3_trainer_free(t.ptr)
		t.ptr = nil
		runtime.SetFinalizer(t, nil)
	}
	return nil
}

func shapeError(what string, n, want int) error {
	return errorf(ErrInvalidArgument, "dsv3: Trainer.", what, ": got ", strconv.Itoa(n), " values, want ", strconv.Itoa(want))
}

// Step runs one optimizer step on batch sequences of seqLen token ids (row-major
// [batch][seqLen], len(ids) = batch*seqLen) with the next-token loss on every position. On
// failure the weights are unchanged.
func (t *Trainer) Step(ids []int32, batch, seqLen int) (StepMetrics, error) {
	if batch < 0 || seqLen < 0 || len(ids) != batch*seqLen {
		return StepMetrics{}, shapeError("Step: ids", len(ids), batch*seqLen)
	}
	return t.step(ids, nil, batch, seqLen)
}

// StepSFT is Step with a loss mask of batch*(seqLen-1) weights: position t (predicting token
// t+1 of its row) counts with weight mask[t] (1 = completion token, 0 = prompt).
func (t *Trainer) StepSFT(ids []int32, mask []float32, batch, seqLen int) (StepMetrics, error) {
	if batch < 0 || seqLen < 0 || len(ids) != batch*seqLen {
		return StepMetrics{}, shapeError("StepSFT: ids", len(ids), batch*seqLen)
	}
	if seqLen >= 1 && len(mask) != batch*(seqLen-1) {
		return StepMetrics{}, shapeError("StepSFT: mask", len(mask), batch*(seqLen-1))
	}
	if mask == nil {
		mask = []float32{} // NULL means "no mask" nowhere: keep it an SFT step
	}
	return t.step(ids, mask, batch, seqLen)
}

func (t *Trainer) step(ids []int32, mask []float32, batch, seqLen int) (StepMetrics, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return StepMetrics{}, closedError("Trainer.Step")
	}
	var m C.dsv3_step_metrics
	m.struct_size = C.size_t(unsafe.Sizeof(m))
	err := call(func() C.enum_dsv3_status {
		if mask == nil {
			return C.dsv3_trainer_step(t.ptr, i32ptr(ids), C.size_t(batch), C.size_t(seqLen), &m)
		}
		var mp *C.float
		if len(mask) > 0 {
			mp = (*C.float)(unsafe.Pointer(&mask[0]))
		}
		return C.dsv3_trainer_step_sft(t.ptr, i32ptr(ids), mp, C.size_t(batch), C.size_t(seqLen), &m)
	})
	if err != nil {
		return StepMetrics{}, err
	}
	return StepMetrics{
		Step:            uint64(m.step),
		Loss:            float32(m.loss),
		BalanceLoss:     float32(m.balance_loss),
		MTPLoss:         float32(m.mtp_loss),
		GradNorm:        float32(m.grad_norm),
		LR:              float32(m.lr),
		Tokens:          uint64(m.tokens),
		TokensPerSec:    float64(m.tokens_per_s),
		MaxOverMeanLoad: float32(m.max_over_mean_load),
	}, nil
}

// ExpertLoad returns the tokens routed to each expert of MoE layer moeLayer (0 = the first MoE
// layer) in the last step.
func (t *Trainer) ExpertLoad(moeLayer int) ([]uint32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return nil, closedError("Trainer.ExpertLoad")
	}
	if moeLayer < 0 {
		return nil, errorf(ErrInvalidArgument, "dsv3: Trainer.ExpertLoad: negative layer ", strconv.Itoa(moeLayer))
	}
	var loads []uint32
	for {
		var needed C.size_t
		var p *C.uint32_t
		if len(loads) > 0 {
			p = (*C.uint32_t)(unsafe.Pointer(&loads[0]))
		}
		err := call(func() C.enum_dsv3_status {
			return C.dsv3_trainer_expert_load(t.ptr, C.size_t(moeLayer), p, C.size_t(len(loads)), &needed)
		})
		if isTooSmall(err) && int(needed) > len(loads) {
			loads = make([]uint32, needed)
			continue
		}
		if err != nil {
			return nil, err
		}
		return loads[:needed], nil
	}
}

// Save writes a checkpoint directory (HF-format model + optimizer + trainer state)
// atomically: a failure leaves a previous checkpoint at dir intact.
func (t *Trainer) Save(dir string) error {
	cdir, err := cstring("dir", dir)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(cdir))
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return closedError("Trainer.Save")
	}
	return call(func() C.enum_dsv3_status { return C.dsv3_trainer_save(t.ptr, cdir) })
}

// Model returns a model with the trainer's current weights (a snapshot, for inference).
func (t *Trainer) Model() (*Model, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return nil, closedError("Trainer.Model")
	}
	var out *C.dsv3_model
	if err := call(func() C.enum_dsv3_status { return C.dsv3_trainer_model(t.ptr, &out) }); err != nil {
		return nil, err
	}
	return newModel(out), nil
}
