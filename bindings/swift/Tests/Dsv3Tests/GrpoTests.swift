// GRPO: Swift reward closures (called prompts × G times, nil = does not apply), a built-in reward,
// the reward rising over 40 steps on the byte-level "tiny" preset (as ffi/tests/abi.rs
// grpo_with_host_and_builtin_rewards), a throwing reward aborting the step and being rethrown,
// re-entry refused, parameters and errors, stop tokens, completions, checkpoint and resume.
import Dsv3
import Foundation
import XCTest

final class GrpoTests: XCTestCase {
    struct ScorerFailed: Error, Equatable {
        let call: Int
    }

    /// A byte-level model (the "tiny" preset, 259 ids): no tokenizer needed.
    func tinyModel() throws -> Model {
        return try Trainer.preset("tiny").snapshotModel()
    }

    func trainParams() -> TrainParams {
        var tp = TrainParams()
        tp.schedule = .constant
        tp.lr = 1e-3
        return tp
    }

    func grpoParams() -> GrpoParams {
        var p = GrpoParams()
        p.numGenerations = 4
        p.maxCompletionLength = 5
        p.beta = 0.04
        return p
    }

    let prompts = ["ab", "cd", "no answer"]
    let answers: [String?] = ["x", "y", nil]

    /// The share of lowercase ASCII letters among the completion's characters.
    static func lowercaseShare(_ completion: String) -> Float {
        let scalars = Array(completion.unicodeScalars)
        let lower = scalars.filter { $0.value >= 97 && $0.value <= 122 }.count
        return Float(lower) / Float(max(scalars.count, 1))
    }

    func assertThrowsStatus<T>(_ status: dsv3_status, _ body: @autoclosure () throws -> T,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), file: file, line: line) { error in
            XCTAssertEqual((error as? Dsv3Error)?.status, status, "\(error)", file: file, line: line)
        }
    }

    func tempDir() -> URL {
        return FileManager.default.temporaryDirectory
            .appendingPathComponent("dsv3-swift-grpo-\(ProcessInfo.processInfo.processIdentifier)-\(UUID().uuidString)")
    }

    func testParamsAndErrors() throws {
        let defaults = GrpoParams()
        XCTAssertEqual(defaults.numGenerations, 8)
        XCTAssertEqual(defaults.maxCompletionLength, 256)
        XCTAssertEqual(defaults.temperature, 1)
        XCTAssertEqual(defaults.topP, 1)
        XCTAssertEqual(defaults.numIterations, 1)
        XCTAssertEqual(defaults.beta, 0)
        XCTAssertEqual(defaults.lossType, .dapo)
        XCTAssertEqual(defaults.scaleRewards, .group)
        XCTAssertFalse(defaults.sequenceLevel)

        let model = try tinyModel()
        var bad = grpoParams()
        bad.numGenerations = 1
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try Grpo(model: model, train: trainParams(), params: bad))
        bad = grpoParams()
        bad.topP = 0
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try Grpo(model: model, train: trainParams(), params: bad))
        bad = grpoParams()
        bad.numGenerations = -1
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try Grpo(model: model, train: trainParams(), params: bad))

        let grpo = try Grpo(model: model, train: trainParams(), params: grpoParams())
        XCTAssertEqual(grpo.numGenerations, 4)
        // no reward yet; unknown built-in; duplicate names
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.step(prompts: prompts, answers: answers))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.addReward("bogus"))
        try grpo.addReward("exact", weight: 0.5)
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.addReward("exact"))
        XCTAssertEqual(grpo.rewardNames, ["exact"])
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.addReward("inf weight", weight: .infinity))
        // before the first step there is nothing to read
        XCTAssertEqual(try grpo.completions(), [])
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.numCompletions())
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.rewardStats(0))
        // the Swift side checks what C cannot
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.step(prompts: prompts, answers: ["x"]))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.step(prompts: ["a\u{0}b"]))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.step(prompts: []))
        // the tiny preset is byte-level: any text is a prompt; the fixture model (99 ids) needs a tokenizer
        let fixture = try Model(path: try Expected.load().modelPath)
        let other = try Grpo(model: fixture, train: trainParams(), params: grpoParams())
        try other.addReward("exact")
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try other.step(prompts: ["ab"]))
    }

    func testRewardRisesWithSwiftAndBuiltinRewards() throws {
        let grpo = try Grpo(model: try tinyModel(), train: trainParams(), params: grpoParams())
        var calls = 0
        var withoutAnswer = 0
        try grpo.addReward("lower") { prompt, completion, answer in
            calls += 1
            XCTAssertFalse(prompt.isEmpty)
            guard answer != nil else {
                withoutAnswer += 1
                return nil  // does not apply: NaN to C
            }
            return GrpoTests.lowercaseShare(completion)
        }
        try grpo.addReward("exact", weight: 0.5)
        var rewards: [Float] = []
        var last: GrpoMetrics? = nil
        for i in 0..<40 {
            let m = try grpo.step(prompts: prompts, answers: answers)
            XCTAssertEqual(m.step, UInt64(i))
            rewards.append(m.reward)
            last = m
        }
        XCTAssertEqual(calls, 40 * prompts.count * 4, "the reward runs once per completion")
        XCTAssertEqual(withoutAnswer, 40 * 4)
        let m = try XCTUnwrap(last)
        XCTAssertLessThanOrEqual(m.completionLengthMax, 5)
        XCTAssertGreaterThan(m.samplingSeconds, 0)
        XCTAssertGreaterThan(m.learningSeconds, 0)
        XCTAssertGreaterThan(m.kl, 0, "β > 0: the policy moved away from the reference")
        let first = rewards[..<8].reduce(0, +) / 8
        let tail = rewards[32...].reduce(0, +) / 8
        XCTAssertGreaterThan(tail, first + 0.1, "the reward rises: \(rewards)")

        // per-reward stats, in the metrics and on demand
        XCTAssertEqual(m.rewards.map { $0.name }, ["lower", "exact"])
        let lower = try grpo.rewardStats(named: "lower")
        XCTAssertEqual(lower.mean, m.rewards[0].mean)
        XCTAssertTrue(lower.mean > 0 && lower.mean <= 1)
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.rewardStats(2))
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.rewardStats(named: "nope"))

        // completions: 12; the third prompt's have no applicable reward
        XCTAssertEqual(try grpo.numCompletions(), 12)
        let completions = try grpo.completions()
        XCTAssertEqual(completions.count, 12)
        XCTAssertNotNil(completions[0].reward)
        XCTAssertNil(completions[11].reward)
        XCTAssertEqual(try grpo.completion(3), completions[3])
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.completion(12))
    }

    func testThrowingRewardAbortsTheStepAndIsRethrown() throws {
        let grpo = try Grpo(model: try tinyModel(), train: trainParams(), params: grpoParams())
        var calls = 0
        var failAt: Int? = nil
        try grpo.addReward("lower") { _, completion, _ in
            calls += 1
            if let at = failAt, calls == at {
                throw ScorerFailed(call: calls)
            }
            return GrpoTests.lowercaseShare(completion)
        }
        let first = try grpo.step(prompts: prompts, answers: answers)
        XCTAssertEqual(first.step, 0)
        let before = try grpo.completions()

        failAt = calls + 3
        XCTAssertThrowsError(try grpo.step(prompts: prompts, answers: answers)) { error in
            XCTAssertEqual(error as? ScorerFailed, ScorerFailed(call: calls))
        }
        XCTAssertEqual(calls, failAt ?? -1, "no reward call after the throw")
        // the failed step left the trainer as it was: same last batch, the step not counted
        XCTAssertEqual(try grpo.completions(), before)
        failAt = nil
        let next = try grpo.step(prompts: prompts, answers: answers)
        XCTAssertEqual(next.step, 1)

        // a reward returning a non-finite value fails the step with DSV3_ERR_NON_FINITE
        try grpo.addReward("infinite") { _, _, _ in Float.infinity }
        assertThrowsStatus(DSV3_ERR_NON_FINITE, try grpo.step(prompts: prompts, answers: answers))
    }

    func testRewardCannotUseItsGrpo() throws {
        let grpo = try Grpo(model: try tinyModel(), train: trainParams(), params: grpoParams())
        try grpo.addReward("reentrant") { [unowned grpo] _, _, _ in
            try grpo.save(to: "/nonexistent/dsv3-grpo-reentry")
            return 1
        }
        XCTAssertThrowsError(try grpo.step(prompts: prompts, answers: answers)) { error in
            let e = error as? Dsv3Error
            XCTAssertEqual(e?.status, DSV3_ERR_INVALID_ARGUMENT)
            XCTAssertTrue(e?.message.contains("reward function") ?? false, "\(error)")
        }
        // still usable afterwards
        try grpo.setStopTokens([10])
        XCTAssertEqual(try grpo.completions(), [])
    }

    func testStopTokensCheckpointAndResume() throws {
        let model = try tinyModel()
        let grpo = try Grpo(model: model, train: trainParams(), params: grpoParams())
        try grpo.addReward("lower") { _, completion, _ in GrpoTests.lowercaseShare(completion) }
        try grpo.setStopTokens([10])
        assertThrowsStatus(DSV3_ERR_INVALID_ARGUMENT, try grpo.setStopTokens([100_000]))
        try grpo.setStopTokens([])
        var last: GrpoMetrics? = nil
        for _ in 0..<2 {
            last = try grpo.step(prompts: prompts)
        }
        // without stop tokens every completion runs to maxCompletionLength
        XCTAssertEqual(try XCTUnwrap(last).completionLengthMean, 5)
        XCTAssertEqual(try XCTUnwrap(last).completionLengthMax, 5)

        let snapshot = try grpo.snapshotModel()
        XCTAssertEqual(snapshot.info.vocabSize, 259)
        var sampling = SamplingParams()
        sampling.maxNewTokens = 4
        XCTAssertEqual(try snapshot.generate(prompt: [97, 98], params: sampling).count, 4)

        let dir = tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try grpo.save(to: dir.path)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.appendingPathComponent("model.safetensors").path))
        // resume: the step count carries over; rewards are added again
        let resumed = try Grpo.load(from: dir.path, reference: model, train: trainParams(), params: grpoParams())
        XCTAssertEqual(resumed.rewardNames, [])
        try resumed.addReward("exact")
        let m = try resumed.step(prompts: prompts, answers: answers)
        XCTAssertEqual(m.step, 2)
        // as a plain trainer too
        _ = try Trainer.load(from: dir.path, params: trainParams())
        assertThrowsStatus(DSV3_ERR_IO, try Grpo.load(from: "/nonexistent/dsv3-grpo-checkpoint"))
    }
}
